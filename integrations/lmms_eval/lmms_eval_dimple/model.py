"""`lmms-eval --model dimple`: Dimple answers each request by masked diffusion (`diffusion_generate`).

    lmms-eval --model dimple --model_args pretrained=rp-yu/Dimple-7B --tasks mme --batch_size 1
    lmms-eval --model dimple --model_args pretrained=checkpoints/dimple-shapes,steps=16 --tasks shapes_vqa \
        --include_path shapes/lmms_eval_task
    torchrun --nproc_per_node 2 -m lmms_eval --model dimple ...      # CPU: one share of the questions per process
    accelerate launch --num_processes 8 -m lmms_eval --model dimple ...  # GPUs: one process per GPU

The model and its processor load with `trust_remote_code`, so any Dimple checkpoint folder or Hub id works and this
plugin imports nothing from the Dimple repository.

Generation settings resolve as `PUBLISHED_SETTINGS` < `--model_args` < the task's `generation_kwargs` and
`--gen_kwargs`. Any `diffusion_generate` setting can be given (`steps`, `alg`, `alg_p_threshold`,
`decoding_pipeline`, `use_cache`, `top_k`, ...); an unknown one raises `TypeError` at the first batch. lmms-eval's own
keys are translated: `until` cuts the answer at the first stop string, `do_sample: false` means temperature 0, and
`num_beams` > 1 is refused (diffusion decoding has no beams). When `steps` is set nowhere it follows
`max_new_tokens` (steps = N, as in every published Dimple run).

Each row of a batch is decoded on its own, so batching changes no answer at temperature 0.
"""

import os

import torch
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


class Dimple(lmms):
    """lmms-eval "simple" model: (context, generation_kwargs, doc_to_visual, doc_id, task, split) requests."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        system_prompt: str | None = None,
        trust_remote_code: bool = True,
        **settings,
    ) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self._device = torch.device(device or default_device())
        self._model = (
            AutoModel.from_pretrained(pretrained, trust_remote_code=trust_remote_code, dtype=resolve_dtype(dtype))
            .to(self._device)
            .eval()
        )
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        self.batch_size_per_device = int(batch_size)
        self.system_prompt = system_prompt
        self.settings = settings
        self.forward_passes, self.answer_tokens = 0, 0

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
        reorder = utils.Collator(
            [request.args for request in requests], lambda args: (-len(args[0]), args[0]), grouping=True
        )
        answers = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="Dimple answering")
        for chunk in reorder.get_batched(n=self.batch_size, batch_fn=None):
            contexts, generation_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            visuals = [
                as_list(to_visual(self.task_dict[task][split][doc_id]))
                for to_visual, doc_id, task, split in zip(doc_to_visual, doc_ids, tasks, splits)
            ]
            settings, stop_strings = generation_settings(self.settings, generation_kwargs[0])
            answers += [cut_at_stop_strings(text, stop_strings) for text in self.answer(contexts, visuals, settings)]
            progress.update(len(chunk))
        progress.close()
        logger.info(
            f"Dimple rank {self.rank}/{self.world_size}: {len(requests)} questions, {self.forward_passes} forward "
            f"passes for {self.answer_tokens} answer tokens ({self.forward_passes / max(1, self.answer_tokens):.3f} "
            "per token)."
        )
        return reorder.get_original(answers)

    @torch.inference_mode()
    def answer(self, contexts, visuals, settings) -> list[str]:
        prompts = [self.processor.apply_chat_template(self.messages(c, v), add_generation_prompt=True)
                   for c, v in zip(contexts, visuals)]  # fmt: skip
        images = [image for row in visuals for image in row]
        inputs = self.processor(text=prompts, images=images or None, padding="longest", return_tensors="pt")
        output = self.model.diffusion_generate(**inputs.to(self.device), **settings, return_dict_in_generate=True)
        answers = output.sequences[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.post_process_answer(answers)
        self.forward_passes += int(output.num_forward_passes.sum())
        self.answer_tokens += sum(len(self.tokenizer.encode(text, add_special_tokens=False)) for text in texts)
        return texts

    def messages(self, context: str, images: list) -> list[dict]:
        # Images first, then the question (the layout of LLaVA-style training data and of lmms-eval prompts).
        content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": context}]
        messages = [{"role": "user", "content": content}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages


def generation_settings(model_args: dict, generation_kwargs: dict | None) -> tuple[dict, list[str]]:
    """`PUBLISHED_SETTINGS` < `--model_args` settings < a request's generation_kwargs; returns the
    `diffusion_generate` settings and the stop strings."""
    request = dict(generation_kwargs or {})
    stop_strings = request.pop("until", None) or []
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    if int(request.pop("num_beams", 1) or 1) > 1:
        raise ValueError("num_beams > 1: Dimple decodes by diffusion and has no beam search; set num_beams: 1.")
    if request.pop("do_sample", None) is False:
        request["temperature"] = 0.0
    settings = {**PUBLISHED_SETTINGS, **model_args, **request}
    # `--model_args alg_p_threshold=None` arrives as the string "None".
    settings = {name: None if value in ("None", "none") else value for name, value in settings.items()}
    if "steps" not in model_args and "steps" not in request:
        settings["steps"] = settings["max_new_tokens"]
    return settings, stop_strings


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


def as_list(visual) -> list:
    if visual is None:
        return []
    return list(visual) if isinstance(visual, (list, tuple)) else [visual]


def cut_at_stop_strings(text: str, stop_strings: list[str]) -> str:
    for stop in stop_strings:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text
