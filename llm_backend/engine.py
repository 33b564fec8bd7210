"""The ONNX decoder's old module name: the decoder is `llm_backend.decoder` now.

Kept only for importers outside this package that still use the old name
(stack/default_model.py, bench/int4_fidelity.py, tests/export/); delete this file once
they import `llm_backend.decoder`. `llm_backend.engine` is the very same module object,
so monkeypatching either name patches both.
"""

import sys

from . import decoder

sys.modules[__name__] = decoder
