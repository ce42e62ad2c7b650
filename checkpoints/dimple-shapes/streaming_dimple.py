"""Watching a diffusion call: [`DiffusionTextStreamer`] shows every row's answer canvas after every step.

`diffusion_generate` drives any streamer with transformers' diffusion protocol (`put(prompt)`, `put_draft(canvas)`
after each step, `put(answer)`, `end()`), so transformers' own streamers work as they are at batch size 1; this one
is Dimple's own for whole batches, with undecided slots shown as a placeholder. The model never imports it;
`generation_utils.py` re-exports it, so `from generation_utils import DiffusionTextStreamer` keeps working.
"""

import torch

try:
    from .transformers_compat import BaseStreamer
except ImportError:  # no parent package: imported from the repository root rather than as remote code
    if __package__:  # there is one, so the error is real (the version check's): show it, not a missing module
        raise
    from transformers_compat import BaseStreamer


class DiffusionTextStreamer(BaseStreamer):
    """
    Prints every row of the batch after every diffusion step, with still-masked slots shown as `placeholder`.

    For what transformers' `TextDiffusionStreamer` does not do (batches, masks shown as `_`). It follows the same
    protocol: `put(prompt)` first (skipped), `put_draft(canvas)` after each step with the `[batch, N]` answer canvas
    (undecided slots hold the mask id), `put(answer)` once with the final answer, then `end()`. Each canvas replaces
    the previous text. The latest texts are in `self.texts` (`self.final` once the answer is put); override
    `on_canvas` to send them elsewhere (a UI, a log).

    Args:
        tokenizer: decodes the committed tokens.
        mask_token_id (`int`, *optional*): defaults to the tokenizer's `<|mask|>` id.
        placeholder (`str`, defaults to `"_"`): shown for each masked slot.
        decode_kwargs: passed to `tokenizer.decode` (default `skip_special_tokens=True`).
    """

    def __init__(self, tokenizer, mask_token_id: int | None = None, placeholder: str = "_", **decode_kwargs):
        self.tokenizer = tokenizer
        if mask_token_id is None:
            mask_token_id = getattr(tokenizer, "mask_token_id", None)
        if mask_token_id is None:
            mask_token_id = tokenizer.convert_tokens_to_ids("<|mask|>")
        if mask_token_id is None:
            raise ValueError("Pass `mask_token_id`: the tokenizer has no `<|mask|>` token.")
        self.mask_token_id = mask_token_id
        self.placeholder = placeholder
        self.decode_kwargs = {"skip_special_tokens": True, **decode_kwargs}
        self.texts: list[str] = []
        self.steps = 0
        self.prompt_seen = False
        self.final = False
        self.finished = False

    def render(self, token_ids: list[int]) -> str:
        """Decode runs of committed tokens together (so multi-byte characters survive); masks become placeholders."""
        pieces, run = [], []
        for token in token_ids + [None]:
            if token is not None and token != self.mask_token_id:
                run.append(token)
                continue
            if run:
                pieces.append(self.tokenizer.decode(run, **self.decode_kwargs))
                run = []
            if token is not None:
                pieces.append(self.placeholder)
        return "".join(pieces)

    def put_draft(self, value: torch.Tensor):
        self.steps += 1
        self._show(value)

    def put(self, value: torch.Tensor):
        """The prompt (first call, skipped), then the final answer."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.final = True
        self._show(value)

    def end(self):
        self.finished = True

    def _show(self, value: torch.Tensor):
        canvas = value.reshape(-1, value.shape[-1])
        self.texts = [self.render(row) for row in canvas.tolist()]
        self.on_canvas(self.texts, self.steps)

    def on_canvas(self, texts: list[str], step: int):
        label = "answer" if self.final else f"step {step}"
        for row, text in enumerate(texts):
            prefix = f"[{label}]" if len(texts) == 1 else f"[{label}, row {row}]"
            print(f"{prefix} {text}", flush=True)


__all__ = ["DiffusionTextStreamer"]
