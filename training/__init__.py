"""Data preparation and experiment tools around the ``lung_nodule_ct_semantic_clip`` bundle."""
