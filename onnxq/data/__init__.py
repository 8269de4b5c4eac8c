"""Calibration data: loading files, image folders and feeds, capturing intermediate tensors, augmentation."""
