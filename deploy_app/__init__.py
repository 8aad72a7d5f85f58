"""MONAI Deploy application: DICOM CT + nodule seeds in, TID 1500 SR and a readable report out.

Layering: ``deploy_app`` imports the bundle's code (``scripts.*``, from ``bundle/`` beside this
package) and third-party libraries; it never imports ``training`` (a MAP ships no training code).
Importing this package puts the bundle root on ``sys.path``, as ``monai.bundle`` does for a bundle,
so every module uses plain top-of-file ``from scripts.<module> import ...`` imports.
"""

import sys
from pathlib import Path

_BUNDLE_ROOT = str(Path(__file__).resolve().parents[1] / "bundle")
if _BUNDLE_ROOT not in sys.path:
    sys.path.insert(0, _BUNDLE_ROOT)
