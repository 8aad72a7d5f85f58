"""Typed building blocks of the ``lung_nodule_ct_semantic_clip`` bundle.

Configs reference these as ``scripts.<module>.<Name>``; the bundle root must be on ``sys.path``
(``monai.bundle`` puts it there when run from the bundle folder; importing ``deploy_app`` or
``training`` puts it there for them). Layering: this is the ground floor; it imports only
third-party libraries and itself, never ``deploy_app``, ``training``, ``demo`` or ``bench``.
Importing the package makes an uncaught :class:`scripts.errors.UserInputError` print one line instead
of a traceback, so a mistake in a CSV or path reads as such under ``python -m monai.bundle run``.
"""

from scripts.errors import install_excepthook

install_excepthook()
