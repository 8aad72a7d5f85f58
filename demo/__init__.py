"""``make demo``: a phantom CT study through the deploy app to a DICOM SR and a readable report.

Layering: the demo is glue above both floors. It may import ``deploy_app`` (the app), ``training``
(the phantom renderer and the demo bundle builder) and the bundle's ``scripts``; neither
``deploy_app`` nor ``training`` imports ``demo``.
"""

import deploy_app  # noqa: F401  (its __init__ puts the bundle's scripts on sys.path)
