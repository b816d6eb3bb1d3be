"""Apps that the tests run in real worker processes."""

#: A 10,000-character error message, different at every 5-character position ("0000,0001,...")
#: so that a cut shows where it was made.
LONG_MESSAGE = "".join(f"{i:04d}," for i in range(2000))
