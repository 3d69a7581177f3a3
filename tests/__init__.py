"""The test suite; its folders mirror the package (tests/<subpackage>/), scenarios run end to end."""
