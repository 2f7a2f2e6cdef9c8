"""Local stand-ins for the vision-language models and image datasets that TRL's `tests/test_dpo_trainer.py` names.

Like `standins.py` for the text models: tiny configs of the same classes with random weights, filed in a Hugging Face
cache so `from_pretrained("trl-internal-testing/tiny-LlavaForConditionalGeneration")` (model and processor) resolves
offline, and `zen-image` / `zen-multi-image` rows for `datasets.load_dataset`. Each processor is the model's own
processor class with its own image processor (the PIL backend, sized down), the byte-level tokenizer of
`standins.py` with the model's vision tokens added as special tokens, and a chat template that renders
`{"type": "image"}` content as the placeholder that processor expands (`<image>`, `<start_of_image>`,
`<|vision_start|><|image_pad|><|vision_end|>`).

Sizes are chosen so the vision towers and the text model agree on the number of image tokens: every vision tower
sees 16×16 pixels in 4×4 patches (LLaVA-NeXT's any-resolution grid also tiles 16×32 and 32×16), and the generated
images are 16×16 to 24×20 RGB blocks of one colour each.

What cannot run on a machine without torchvision: transformers 5.x builds the processors of the Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, Qwen3.5 (dense and MoE) and Gemma 4 families only with their video processors, which require torchvision
(`BaseVideoProcessor` is not exported without it), so `AutoProcessor.from_pretrained` raises ImportError for them
there, as it would for the Hub's own copies. Their model weights, tokenizer, image-processor config and chat template
are built here all the same (`needs_torchvision`), so the tests run wherever torchvision is installed.
"""

import json
import os
from pathlib import Path


if __package__:  # imported as `compat.vlm_standins` (our tests) or beside `standins` (the runner's work directory)
    from .standins import _ZEN_TEST, _ZEN_TRAIN, COMMIT, COMMON_CONFIG, ORG, build_tokenizer
else:
    from standins import _ZEN_TEST, _ZEN_TRAIN, COMMIT, COMMON_CONFIG, ORG, build_tokenizer


PATCH = 4  # every vision tower: 4×4-pixel patches
IMAGE = 16  # of a 16×16 input (4×4 patches)

# Renders string content (text-only rows) and content lists; `{image}` is the model's image placeholder. One
# expression per piece, so the trim_blocks/lstrip_blocks that transformers turns on change nothing.
_VLM_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.content is string -%}{{- message.content -}}"
    "{%- else -%}{%- for item in message.content -%}"
    "{%- if item.type == 'image' -%}{{- '{image}' -}}"
    "{%- elif item.type == 'text' -%}{{- item.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"

_TEXT = COMMON_CONFIG  # the text stand-ins' sizes: the language model of every VLM stand-in
# A 2-layer tower: LLaVA reads layer -2, which leaves the last layer and post_layernorm unused by design (the
# test asserts exactly that).
_CLIP = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=IMAGE,
    patch_size=PATCH,
    projection_dim=16,
)
_QWEN_VISION = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=PATCH)


def _llava_config(ids: dict, vocab: dict):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(**_CLIP).to_dict(),
        text_config=LlamaConfig(**_TEXT, **ids).to_dict(),
        image_token_index=vocab["<image>"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def _llava_next_config(ids: dict, vocab: dict):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_CLIP).to_dict(),
        text_config=LlamaConfig(**_TEXT, **ids).to_dict(),
        image_token_index=vocab["<image>"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=_PINPOINTS,
    )


def _gemma3_config(ids: dict, vocab: dict):
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    vision = {k: v for k, v in _CLIP.items() if k != "projection_dim"}
    return Gemma3Config(
        # Sliding-window layers as in every Gemma 3 (a 1:1 pattern at this depth).
        text_config=Gemma3TextConfig(**_TEXT, **ids, sliding_window=8, sliding_window_pattern=2).to_dict(),
        vision_config=SiglipVisionConfig(**vision, vision_use_head=False).to_dict(),
        mm_tokens_per_image=4,
        boi_token_index=vocab["<start_of_image>"],
        eoi_token_index=vocab["<end_of_image>"],
        image_token_index=vocab["<image_soft_token>"],
    )


def _qwen_vl_config(model_type: str):
    def config(ids: dict, vocab: dict):
        from transformers import AutoConfig

        vision = dict(_QWEN_VISION)
        if model_type == "qwen2_vl":
            vision.update(embed_dim=16, mlp_ratio=2, spatial_merge_size=2, temporal_patch_size=2)
        elif model_type == "qwen2_5_vl":
            vision.update(out_hidden_size=16, spatial_merge_size=2, fullatt_block_indexes=[1], window_size=8)
        elif model_type == "qwen3_vl":  # deepstack layers feed the text model
            vision.update(out_hidden_size=16, deepstack_visual_indexes=[0], num_position_embeddings=16)
        else:  # qwen3_5, qwen3_5_moe: Qwen3-VL's tower, a text model of gated-delta-net and attention layers
            vision.update(out_hidden_size=16, num_position_embeddings=16)
        text = dict(_TEXT, **ids, rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 0]})
        if model_type.startswith("qwen3_5"):
            text.update(
                layer_types=["linear_attention", "full_attention"],
                linear_num_key_heads=2,
                linear_num_value_heads=2,
                linear_key_head_dim=4,
                linear_value_head_dim=4,
            )
        if model_type == "qwen3_5_moe":
            text.update(
                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16
            )
        return AutoConfig.for_model(
            model_type,
            text_config=text,
            vision_config=vision,
            image_token_id=vocab["<|image_pad|>"],
            video_token_id=vocab["<|video_pad|>"],
            vision_start_token_id=vocab["<|vision_start|>"],
            vision_end_token_id=vocab["<|vision_end|>"],
        )

    return config


_PINPOINTS = [[16, 16], [16, 32], [32, 16]]


def _clip_processor(kind: str):
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    size = dict(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    if kind == "llava_next":
        return LlavaNextImageProcessorPil(**size, image_grid_pinpoints=_PINPOINTS)
    return LlavaImageProcessorPil(**size)


def _siglip_processor():
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    return Gemma3ImageProcessorPil(size={"height": IMAGE, "width": IMAGE})


def _qwen_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # max_pixels keeps every test image within 16×16 pixels (at most 4×4 patches, merged 2×2: 1 to 4 image tokens).
    return Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=2, min_pixels=IMAGE * IMAGE, max_pixels=IMAGE * IMAGE)


# Hub id → (model class, config builder, extra special tokens, image placeholder in the template, processor kind).
VISION_MODELS = {
    "tiny-LlavaForConditionalGeneration": (
        "LlavaForConditionalGeneration",
        _llava_config,
        ["<image>"],
        "<image>",
        "llava",
    ),
    "tiny-LlavaNextForConditionalGeneration": (
        "LlavaNextForConditionalGeneration",
        _llava_next_config,
        ["<image>"],
        "<image>",
        "llava_next",
    ),
    "tiny-Gemma3ForConditionalGeneration": (
        "Gemma3ForConditionalGeneration",
        _gemma3_config,
        ["<start_of_image>", "<image_soft_token>", "<end_of_image>"],
        "<start_of_image>",
        "gemma3",
    ),
    "tiny-Qwen2VLForConditionalGeneration": (
        "Qwen2VLForConditionalGeneration",
        _qwen_vl_config("qwen2_vl"),
        QWEN_VISION_TOKENS,
        QWEN_IMAGE,
        "qwen2_vl",
    ),
    "tiny-Qwen2_5_VLForConditionalGeneration": (
        "Qwen2_5_VLForConditionalGeneration",
        _qwen_vl_config("qwen2_5_vl"),
        QWEN_VISION_TOKENS,
        QWEN_IMAGE,
        "qwen2_5_vl",
    ),
    "tiny-Qwen3VLForConditionalGeneration": (
        "Qwen3VLForConditionalGeneration",
        _qwen_vl_config("qwen3_vl"),
        QWEN_VISION_TOKENS,
        QWEN_IMAGE,
        "qwen3_vl",
    ),
    "tiny-Qwen3_5ForConditionalGeneration-NoThink": (
        "Qwen3_5ForConditionalGeneration",
        _qwen_vl_config("qwen3_5"),
        QWEN_VISION_TOKENS,
        QWEN_IMAGE,
        "qwen3_vl",
    ),
    "tiny-Qwen3_5MoeForConditionalGeneration-3.6": (
        "Qwen3_5MoeForConditionalGeneration",
        _qwen_vl_config("qwen3_5_moe"),
        QWEN_VISION_TOKENS,
        QWEN_IMAGE,
        "qwen3_vl",
    ),
}
# Processor kinds whose transformers processor class needs torchvision (a video processor is one of its parts).
NEEDS_TORCHVISION = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}
# Named by TRL's tests, not built: its processor needs torchvision (video) and an audio feature extractor, so no
# processor of it can be made here to check a stand-in's vision and audio token counts against.
NOT_BUILT = {"tiny-Gemma4ForConditionalGeneration": "Gemma4Processor needs torchvision and an audio feature extractor"}


def torchvision_available() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def build_vlm_tokenizer(special_tokens: list[str], placeholder: str):
    """The stand-in tokenizer with the model's vision tokens and a template that renders images as `placeholder`."""
    from transformers import PreTrainedTokenizerFast

    base = build_tokenizer()
    base.add_special_tokens({"additional_special_tokens": special_tokens})
    extra = {}
    if "<start_of_image>" in special_tokens:  # Gemma3Processor reads these three names from the tokenizer
        extra = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        pad_token=base.pad_token,
        eos_token=base.eos_token,
        extra_special_tokens=extra or None,
    )
    tokenizer.chat_template = _VLM_TEMPLATE.replace("{image}", placeholder)
    return tokenizer


def build_processor(name: str):
    """The processor of stand-in `name` (a key of `VISION_MODELS`), built in memory."""
    from transformers import Gemma3Processor, LlavaNextProcessor, LlavaProcessor

    _, _, special, placeholder, kind = VISION_MODELS[name]
    tokenizer = build_vlm_tokenizer(special, placeholder)
    template = tokenizer.chat_template
    if kind in ("llava", "llava_next"):
        cls = LlavaProcessor if kind == "llava" else LlavaNextProcessor
        return cls(
            image_processor=_clip_processor(kind),
            tokenizer=tokenizer,
            patch_size=PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's class token
            chat_template=template,
        )
    if kind == "gemma3":
        return Gemma3Processor(_siglip_processor(), tokenizer, chat_template=template, image_seq_length=4)
    import transformers

    cls = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}[kind]
    # Only with torchvision (see the module docstring); the tests send no video, so its sizes only mirror the images'.
    video = "Qwen3VLVideoProcessor" if kind == "qwen3_vl" else "Qwen2VLVideoProcessor"
    return getattr(transformers, cls)(
        image_processor=_qwen_processor(),
        tokenizer=tokenizer,
        video_processor=getattr(transformers, video)(patch_size=PATCH, merge_size=2),
        chat_template=template,
    )


def build_model(name: str, tokenizer, dtype=None):
    """A freshly initialised (seeded) model of stand-in `name` whose vocabulary is `tokenizer`'s."""
    import torch
    import transformers

    cls_name, make_config, _, _, _ = VISION_MODELS[name]
    vocab = tokenizer.get_vocab()
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config = make_config({**ids, "bos_token_id": None}, vocab)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config)
    return model.to(dtype) if dtype is not None else model


def save_vlm(name: str, directory: Path) -> None:
    """Write stand-in `name` (weights, config, tokenizer, image processor, processor config, chat template)."""
    _, _, special, placeholder, kind = VISION_MODELS[name]
    if kind in NEEDS_TORCHVISION and not torchvision_available():
        # The processor cannot be instantiated here; its parts are written so it loads wherever torchvision is.
        tokenizer = build_vlm_tokenizer(special, placeholder)
        build_model(name, tokenizer).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        _qwen_processor().save_pretrained(directory)
        processor_class = "Qwen2VLProcessor" if kind == "qwen2_vl" else "Qwen2_5_VLProcessor"
        processor_class = "Qwen3VLProcessor" if kind == "qwen3_vl" else processor_class
        (directory / "processor_config.json").write_text(json.dumps({"processor_class": processor_class}))
        (directory / "chat_template.jinja").write_text(tokenizer.chat_template)
        return
    processor = build_processor(name)
    build_model(name, processor.tokenizer).save_pretrained(directory)
    processor.save_pretrained(directory)


def build_vision_cache(cache: Path) -> Path:
    """Build every vision stand-in once under `cache` (an `HF_HUB_CACHE`, laid out as `standins.build_hub_cache`)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in VISION_MODELS:
        repo = cache / f"models--{ORG}--{name}"
        snapshot = repo / "snapshots" / COMMIT
        if (snapshot / "config.json").is_file():
            continue
        staging = repo / "snapshots" / f".{COMMIT}.{os.getpid()}"
        save_vlm(name, staging)
        staging.rename(snapshot)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(COMMIT)
    return cache


_COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
_SIZES = [(16, 16), (24, 20), (20, 24), (16, 24)]


def image(index: int):
    """A small one-colour RGB image (sizes vary, so processors resize); `index` picks the colour and size."""
    from PIL import Image

    colour = list(_COLOURS.values())[index % len(_COLOURS)]
    return Image.new("RGB", _SIZES[index % len(_SIZES)], colour)


def _image_rows(rows: list[tuple[str, str, str]], multi: bool, offset: int) -> list[dict]:
    """Conversational preference rows with an `images` column, as in `zen-image` (one image a row) and
    `zen-multi-image` (0, 1 or 2 images a row: text-only rows mixed in)."""
    out = []
    for i, (prompt, chosen, rejected) in enumerate(rows):
        count = i % 3 if multi else 1
        out.append(
            {
                "images": [image(offset + i + k) for k in range(count)],
                "prompt": [{"role": "user", "content": f"Complete: {prompt}"}],
                "chosen": [{"role": "assistant", "content": chosen.strip()}],
                "rejected": [{"role": "assistant", "content": rejected.strip()}],
            }
        )
    return out


def image_dataset_rows(path: str, name: str | None) -> dict[str, list[dict]] | None:
    """The rows of each split of an image stand-in dataset, or None when `path` has none."""
    if name != "conversational_preference" or path not in (f"{ORG}/zen-image", f"{ORG}/zen-multi-image"):
        return None
    multi = path.endswith("multi-image")
    return {"train": _image_rows(_ZEN_TRAIN, multi, 0), "test": _image_rows(_ZEN_TEST, multi, len(_ZEN_TRAIN))}
