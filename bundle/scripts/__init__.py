"""Typed building blocks of the ``lung_nodule_ct_semantic_clip`` bundle.

Configs reference these as ``scripts.<module>.<Name>``; the bundle root must be on ``sys.path``
(``monai.bundle`` does this when run from the bundle folder; ``scripts.bundle_path`` helps others).
"""
