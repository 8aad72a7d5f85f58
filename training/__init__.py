"""Data preparation and experiment tools around the ``lung_nodule_ct_semantic_clip`` bundle.

Layering: ``training`` imports the bundle's code (``scripts.*``, from ``bundle/`` beside this
package) and third-party libraries; it never imports ``deploy_app``. Importing this package puts the
bundle root on ``sys.path``, as ``monai.bundle`` does for a bundle, so every module uses plain
top-of-file ``from scripts.<module> import ...`` imports.
"""

import sys
from pathlib import Path

_BUNDLE_ROOT = str(Path(__file__).resolve().parents[1] / "bundle")
if _BUNDLE_ROOT not in sys.path:
    sys.path.insert(0, _BUNDLE_ROOT)
