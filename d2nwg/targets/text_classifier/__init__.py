"""The ``text-adapter`` target family: a frozen sentence encoder + adapter slice + head."""
