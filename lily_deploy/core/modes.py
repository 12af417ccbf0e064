"""The routing modes, in one place and free of heavy imports (the CLI's choices read them).

Encoders route by ``batch`` (PEFT's semantics), ``sample`` or ``token``; decoders generating
with a KV cache need a mode whose mixing vector for a token never changes once that token is
cached: ``prompt`` (the mean over the prompt, frozen for the response), ``causal`` (the running
mean over the tokens so far) or ``token``. ``static`` is a frozen vector (folds into W0).
"""

MODES = ("batch", "sample", "token", "static", "prompt", "causal")
DYNAMIC_MODES = ("batch", "sample", "token")  # encoder export and fold choices
DECODER_MODES = ("prompt", "causal", "token")  # exact under a KV cache
STATE_MODES = ("prompt", "causal")  # carry a routing state between decode steps
CACHE_INCONSISTENT = ("batch", "sample")  # their vector changes as tokens are generated
