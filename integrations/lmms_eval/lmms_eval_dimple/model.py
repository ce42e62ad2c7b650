"""`lmms-eval --model dimple`: Dimple answers each request by masked diffusion (`diffusion_generate`).

    lmms-eval --model dimple --model_args pretrained=rp-yu/Dimple-7B --tasks mme --batch_size 1
    lmms-eval --model dimple --model_args pretrained=checkpoints/dimple-shapes,steps=16 --tasks shapes_vqa \
        --include_path shapes/lmms_eval_task
    torchrun --nproc_per_node 2 -m lmms_eval --model dimple ...      # CPU: one share of the questions per process
    accelerate launch --num_processes 8 -m lmms_eval --model dimple ...  # GPUs: one process per GPU

The model and its processor load with `trust_remote_code`, so any Dimple checkpoint folder or Hub id works and this
plugin imports nothing from the Dimple repository.

Generation settings resolve as `PUBLISHED_SETTINGS` < `--model_args` < the task's `generation_kwargs` and
`--gen_kwargs`; a `--model_args` setting that the task sets to another value is logged once as a warning naming both
values. Any `diffusion_generate` setting can be given (`steps`, `alg`, `alg_p_threshold`,
`decoding_pipeline`, `use_cache`, `top_k`, ...); an unknown one raises `TypeError` at the first batch. lmms-eval's own
keys are translated: `until` cuts the answer at the first stop string, `do_sample: false` means temperature 0, and
`num_beams` > 1 is refused (diffusion decoding has no beams). When `steps` is set nowhere it follows
`max_new_tokens` (steps = N, as in every published Dimple run).

Each row of a batch is decoded on its own, so batching changes no answer at temperature 0. `--batch_size auto`
(or `auto:N`) on a GPU starts at `--max_batch_size` (default 64) and halves the batch on every out-of-memory error,
retrying the rows that failed; on a CPU it runs batch size 1 and says why (running out of memory there kills the
process instead of raising, so no size can be probed).

Each process logs its forward passes per answer token; under torchrun or accelerate, rank 0 also logs the figure of
all processes together (gathered at lmms-eval's end of run; the padding requests that even out the ranks' shares
are left out).
"""

import os

import torch
import torch.distributed as dist
from lmms_eval import utils
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm import tqdm
from transformers import AutoModel, AutoProcessor

# The benchmark settings of the released Dimple-7B (its paper's evaluation, batch size 1): the dream schedule with
# greedy tokens. `top_k=50` reproduces the filter that transformers 4.46 applied silently to every published run.
PUBLISHED_SETTINGS = dict(
    max_new_tokens=8,
    temperature=0.0,
    top_p=0.01,
    top_k=50,
    alg="maskgit_plus",
    alg_temp=0.0,
    use_original_confidence=False,
    decoding_pipeline="dream",
    use_cache=True,
)
AUTO_START_BATCH_SIZE = 64  # `--batch_size auto` without `--max_batch_size`: lmms-eval's and lm-eval's usual cap
PADDING_FLAG = "__padding_only__"  # lmms-eval's metadata mark on requests that only even out the ranks' shares


class Dimple(lmms):
    """lmms-eval "simple" model: (context, generation_kwargs, doc_to_visual, doc_id, task, split) requests."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        system_prompt: str | None = None,
        trust_remote_code: bool = True,
        **settings,
    ) -> None:
        super().__init__()
        self._device = torch.device(device or default_device())
        self.auto_batch_size = is_auto(batch_size)
        self.batch_size_per_device = resolve_batch_size(batch_size, max_batch_size, self._device)
        self._model = (
            AutoModel.from_pretrained(pretrained, trust_remote_code=trust_remote_code, dtype=resolve_dtype(dtype))
            .to(self._device)
            .eval()
        )
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        self.system_prompt = system_prompt
        self.settings = settings
        self.questions, self.forward_passes, self.answer_tokens = 0, 0, 0
        self.overrides_warned: set[str] = set()

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return self.batch_size_per_device

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "Dimple is a masked-diffusion model without left-to-right likelihoods; use generation tasks "
            "(output_type: generate_until)."
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("Multi-round generation is not supported by the Dimple plugin.")

    def generate_until(self, requests) -> list[str]:
        # Batches share one set of generation_kwargs (lmms-eval's Collator groups by them); longest prompts first.
        rows = [(*request.args, is_padding(request)) for request in requests]
        reorder = utils.Collator(rows, lambda args: (-len(args[0]), args[0]), grouping=True)
        answers = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Dimple answering")
        for chunk in reorder.get_batched(n=self.batch_size, batch_fn=None):
            contexts, generation_kwargs, doc_to_visual, doc_ids, tasks, splits, padding = zip(*chunk)
            visuals = [
                as_list(to_visual(self.task_dict[task][split][doc_id]))
                for to_visual, doc_id, task, split in zip(doc_to_visual, doc_ids, tasks, splits)
            ]
            self.warn_about_overrides(generation_kwargs[0])
            settings, stop_strings = generation_settings(self.settings, generation_kwargs[0])
            texts = self.answer_in_fitting_batches(list(contexts), visuals, settings, padding)
            answers += [cut_at_stop_strings(text, stop_strings) for text in texts]
            progress.update(len(chunk))
        progress.close()
        tally = self.passes_per_token(self.questions, self.forward_passes, self.answer_tokens)
        logger.info(f"Dimple rank {self.rank}/{self.world_size}: {tally}")
        return reorder.get_original(answers)

    def answer_in_fitting_batches(self, contexts, visuals, settings, padding) -> list[str]:
        """Answer the rows in batches of the current batch size. With `--batch_size auto`, an out-of-memory error
        halves the batch size and the failed rows are answered again: each row is decoded on its own, so the batch
        size changes no answer."""
        texts, start = [], 0
        while start < len(contexts):
            size = self.batch_size_per_device
            rows = slice(start, start + size)
            try:
                texts += self.answer(contexts[rows], visuals[rows], settings, padding[rows])
            except torch.OutOfMemoryError:
                if not self.auto_batch_size or size == 1:
                    raise
                self.batch_size_per_device = size // 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                logger.warning(f"Dimple --batch_size auto: out of memory at {size} rows; retrying with {size // 2}.")
                continue
            start += size
        return texts

    @torch.inference_mode()
    def answer(self, contexts, visuals, settings, padding=None) -> list[str]:
        prompts = [self.processor.apply_chat_template(self.messages(c, v), add_generation_prompt=True)
                   for c, v in zip(contexts, visuals)]  # fmt: skip
        images = [image for row in visuals for image in row]
        inputs = self.processor(text=prompts, images=images or None, padding="longest", return_tensors="pt")
        output = self.model.diffusion_generate(**inputs.to(self.device), **settings, return_dict_in_generate=True)
        answers = output.sequences[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.post_process_answer(answers)
        padding = padding or [False] * len(texts)
        for text, passes, pad in zip(texts, output.num_forward_passes.tolist(), padding):
            if not pad:
                self.questions += 1
                self.forward_passes += int(passes)
                self.answer_tokens += len(self.tokenizer.encode(text, add_special_tokens=False))
        return texts

    def warn_about_overrides(self, generation_kwargs: dict | None):
        for message in overridden_model_args(self.settings, generation_kwargs):
            if message not in self.overrides_warned:
                self.overrides_warned.add(message)
                logger.warning(message)

    @staticmethod
    def passes_per_token(questions: int, passes: int, tokens: int) -> str:
        return (
            f"{questions} questions, {passes} forward passes for {tokens} answer tokens "
            f"({passes / max(1, tokens):.3f} per token)."
        )

    def clean(self):
        """lmms-eval's end of run, called on every process: rank 0 logs the passes per token of all processes."""
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            # NCCL reduces only GPU tensors, gloo only CPU ones.
            device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
            totals = torch.tensor([self.questions, self.forward_passes, self.answer_tokens], device=device)
            dist.all_reduce(totals)
            if self.rank == 0:
                logger.info(f"Dimple, all {self.world_size} processes: {self.passes_per_token(*totals.tolist())}")
        super().clean()

    def messages(self, context: str, images: list) -> list[dict]:
        # Images first, then the question (the layout of LLaVA-style training data and of lmms-eval prompts).
        content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": context}]
        messages = [{"role": "user", "content": content}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages


def request_settings(generation_kwargs: dict | None) -> tuple[dict, list[str]]:
    """A request's generation_kwargs as `diffusion_generate` settings (lmms-eval's keys translated), and its stop
    strings."""
    request = dict(generation_kwargs or {})
    stop_strings = request.pop("until", None) or []
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    if int(request.pop("num_beams", 1) or 1) > 1:
        raise ValueError("num_beams > 1: Dimple decodes by diffusion and has no beam search; set num_beams: 1.")
    if request.pop("do_sample", None) is False:
        request["temperature"] = 0.0
    return request, stop_strings


def generation_settings(model_args: dict, generation_kwargs: dict | None) -> tuple[dict, list[str]]:
    """`PUBLISHED_SETTINGS` < `--model_args` settings < a request's generation_kwargs; returns the
    `diffusion_generate` settings and the stop strings."""
    request, stop_strings = request_settings(generation_kwargs)
    settings = {**PUBLISHED_SETTINGS, **model_args, **request}
    # `--model_args alg_p_threshold=None` arrives as the string "None".
    settings = {name: none_if_named(value) for name, value in settings.items()}
    if "steps" not in model_args and "steps" not in request:
        settings["steps"] = settings["max_new_tokens"]
    return settings, stop_strings


def overridden_model_args(model_args: dict, generation_kwargs: dict | None) -> list[str]:
    """One message per `--model_args` setting that a request's generation_kwargs set to another value."""
    request, _ = request_settings(generation_kwargs)
    messages = []
    for name in sorted(model_args.keys() & request.keys()):
        ours, theirs = none_if_named(model_args[name]), none_if_named(request[name])
        if ours != theirs:
            translated = name == "temperature" and "temperature" not in generation_kwargs
            source = " (from do_sample: false)" if translated else ""
            messages.append(
                f"Dimple: --model_args {name}={ours!r} is overridden by the task's generation_kwargs (or --gen_kwargs) "
                f"{name}={theirs!r}{source}; the task's value is used. Drop it from the task's generation_kwargs "
                "(or set it with --gen_kwargs) to choose another."
            )
    return messages


def none_if_named(value):
    return None if value in ("None", "none") else value


def is_auto(batch_size) -> bool:
    return isinstance(batch_size, str) and (batch_size == "auto" or batch_size.startswith("auto:"))


def resolve_batch_size(batch_size, max_batch_size, device: torch.device) -> int:
    """`--batch_size`: N, or auto / auto:N (GPU: the starting size, halved on out-of-memory; CPU: 1)."""
    if is_auto(batch_size):
        if device.type == "cpu":
            logger.warning(
                "Dimple --batch_size auto on CPU: running out of memory there kills the process instead of raising, "
                "so no batch size can be probed; using batch size 1. Pass --batch_size N for larger batches."
            )
            return 1
        start = int(max_batch_size or AUTO_START_BATCH_SIZE)
        logger.info(f"Dimple --batch_size auto: starting at {start} rows, halved on every out-of-memory error.")
        return start
    try:
        size = int(batch_size)
    except (TypeError, ValueError):
        size = 0
    if size < 1 or (isinstance(batch_size, float) and not batch_size.is_integer()):
        raise ValueError(f"batch_size must be a positive integer, 'auto' or 'auto:N', got {batch_size!r}.")
    return size


def default_device() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    # torchrun / accelerate launch: one GPU per process.
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def resolve_dtype(dtype: str):
    if dtype == "auto":
        return "auto"
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype; use auto, float32, bfloat16 or float16.")
    return getattr(torch, dtype)


def is_padding(request) -> bool:
    return bool((getattr(request, "metadata", None) or {}).get(PADDING_FLAG))


def as_list(visual) -> list:
    if visual is None:
        return []
    return list(visual) if isinstance(visual, (list, tuple)) else [visual]


def cut_at_stop_strings(text: str, stop_strings: list[str]) -> str:
    for stop in stop_strings:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text
