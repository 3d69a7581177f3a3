"""What has no other home: atomic file I/O, terminal output and plots."""
