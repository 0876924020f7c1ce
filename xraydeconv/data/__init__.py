"""Data sets: ImageCLEF 2009 / IRMA, ImageFolder, MURA, DICOM and the embedded synthetic phantoms."""
