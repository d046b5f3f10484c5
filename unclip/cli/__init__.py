"""The command-line entry points (`unclip`, `train-clip`, `train-prior`, `train-decoder`, `train-upsampler`).

x-transformers decorates one helper with `torch.jit.script` at import, which torch 2.14 answers with a
FutureWarning on every run; it says nothing to a user of these commands, so the commands hide that one warning.
"""

import warnings

warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
