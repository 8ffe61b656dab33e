"""Serving the champion (`llmops serve`): an OpenAI-style HTTP API that follows the registry's `champion` alias.

Its parts, one file each:
- `engine`: the batching engine; concurrent requests share forward passes. It knows nothing of HTTP.
- `follower`: the champion follower, which keeps the alias's version loaded and swaps a new one in only once it
  is checked to generate.
- `app`: the HTTP app: its handlers, `create_app` that wires them, and `build`/`serve` for `llmops serve`.
  What it speaks is in `protocol` (the OpenAI request and error shapes); what a request must pass before it
  generates in `admission` (keys, body size, prompt limits, a place in the queue, the feedback rate).
- `masking`: nothing the server shows or logs carries a credential.
- `traffic_log`: each answer and its feedback, redacted, as data the monitor and the next retrain read back.
- `generation`: chat messages in, replies out; the code the registered MLflow model runs too.

The server reads the registry (`llmops.registry`); it never writes it. The model logged with each registered
version is packaged by `llmops.packaging`, which no part of serving imports. Importing this package imports
none of its parts: the tasks that read the traffic log need no web framework and no model.
"""
