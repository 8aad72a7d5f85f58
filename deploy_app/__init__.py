"""MONAI Deploy application: DICOM CT + nodule seeds in, TID 1500 SR and a readable report out."""
