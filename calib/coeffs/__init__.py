"""The coefficient document (format ``calib.coefficients``): schema, the one validator, shared sections, file I/O."""
