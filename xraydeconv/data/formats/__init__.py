"""Readers of the on-disk layouts: ImageCLEF 2009 / IRMA, MURA, ImageFolder, and DICOM decoding."""
