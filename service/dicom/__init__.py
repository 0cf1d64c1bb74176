"""DICOM bytes -> model input: header checks, pixel decoding (and its pool), display pipeline, intended-use gate."""
