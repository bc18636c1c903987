"""An exported folder as sentence-transformers reads it: the files that make

    from sentence_transformers import MultiVectorEncoder
    model = MultiVectorEncoder("my-org/colintern-1b-v1")     # or the folder

load a trained ColIntern with sentence-transformers' own modules: no code from this repository, no trust_remote_code.
export.py writes them next to its own files (which keep loading through colintern_model.load_trained):

    modules.json, config_sentence_transformers.json   the module list; MaxSim, no prompts (the formats are below)
    sentence_bert_config.json                         0  Transformer: the backbone (adapter_config.json's
                                                         base_model_name_or_path) with the LoRA adapter on it, both
                                                         loaded by transformers' from_pretrained through peft; every
                                                         input goes through the chat template; tiling (max_tiles)
    chat_template.jinja, processor_config.json,       the backbone's processor (tokenizer, image processor) with
    tokenizer.json, tokenizer_config.json             ColIntern's query and page formats as its chat template
    1_Router/                                         1  Router: task "query" -> Dense (the query head),
                                                         "document" -> Dense (the page head)
    2_Normalize/                                      2  Normalize: L2 per token
    3_MultiVectorMask/                                3  MultiVectorMask: a query keeps every token, a page only its
                                                         image tokens (keep_only_token_ids: the image token)

Each module computes what ColIntern's does, in the same order: the backbone's last hidden state, the head
(nn.Linear), F.normalize, the mask. Nothing needs a custom module. The formats are the one piece written here rather
than configured: ColIntern appends 10 pad tokens to a query (which sentence-transformers' query_expansion cannot say:
it pads to a fixed length) and wraps a page in a prompt (prompts only prefix text), so the chat template renders
both, branching on the task sentence-transformers passes it.
"""

import json
import os

import torch

from colintern_cli import UserValueError
from colintern_model import PAGE_PROMPT, QUERY_AUGMENTATION_TOKENS, QUERY_PREFIX

TRANSFORMER = "sentence_transformers.base.modules.transformer.Transformer"
# Where the modules after the Transformer are saved (modules.json paths), in pipeline order
MODULE_FOLDERS = ("1_Router", "2_Normalize", "3_MultiVectorMask")


def jinja_string(text: str) -> str:
    """A Jinja string literal of `text`: a JSON string is one (escapes included), so no character of a format can be
    read as template syntax or trimmed as whitespace."""
    return json.dumps(text)


def chat_template(image_token: str, pad_token: str) -> str:
    """ColInternProcessor's formats as a chat template: a query (task "query", one text) renders as QUERY_PREFIX +
    text + QUERY_AUGMENTATION_TOKENS pad tokens, a page (any other task, one image; text beside it, such as a
    ViDoRe v3.1 page's OCR, is ignored as ColIntern ignores it) as PAGE_PROMPT. Anything else is refused with a
    message, rather than encoded as something ColIntern never saw."""
    query_suffix = jinja_string(pad_token * QUERY_AUGMENTATION_TOKENS)
    page = jinja_string(PAGE_PROMPT.format(image=image_token))
    refuse = (
        "{{- raise_exception('ColIntern encodes a query as one text (encode_query) and a page as one image "
        "(encode_document); got ' + (items | map(attribute='type') | join(', ') or 'nothing') + ' for task ' + "
        "(task | string)) -}}"
    )
    return "".join(
        [
            "{%- set found = namespace(items=[]) -%}",
            "{%- for message in messages -%}",
            "{%- set found.items = found.items + (message['content'] if message['content'] is not string else "
            "[{'type': 'text', 'text': message['content']}]) -%}",
            "{%- endfor -%}",
            "{%- set items = found.items -%}",
            "{%- set texts = items | selectattr('type', 'equalto', 'text') | list -%}",
            "{%- set images = items | selectattr('type', 'equalto', 'image') | list -%}",
            "{%- if task == 'query' and texts | length == 1 and not images -%}",
            "{{- ",
            jinja_string(QUERY_PREFIX),
            " + texts[0]['text'] + ",
            query_suffix,
            " -}}",
            "{%- elif task != 'query' and images | length == 1 -%}",
            "{{- ",
            page,
            " -}}",
            "{%- else -%}",
            refuse,
            "{%- endif -%}",
        ]
    )


def transformer_config(max_tiles: int) -> dict:
    """sentence_bert_config.json: InternVLModel's last hidden state for every input, each turned into a chat message
    (text queries, image pages), left padded and never truncated as ColInternProcessor does, pages tiled into at most
    max_tiles tiles (+ a thumbnail)."""
    forward = {"method": "forward", "method_output_name": "last_hidden_state"}
    return {
        "transformer_task": "feature-extraction",
        "modality_config": {"text": forward, "image": forward, "message": {**forward, "format": "structured"}},
        "module_output_name": "token_embeddings",
        "processing_kwargs": {
            "text": {"padding_side": "left", "truncation": False},
            "image": {"crop_to_patches": True, "min_patches": 1, "max_patches": max_tiles},
        },
    }


def write_processor(folder: str, model_id: str):
    """The backbone's processor into `folder`, ColIntern's formats as its chat template (the tokenizer's too, so that
    no template of the backbone's is saved over it); -> the processor."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_id)
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        raise UserValueError(
            f"the tokenizer of {model_id} has no pad token: ColIntern's query format appends pad tokens"
        )
    processor.chat_template = tokenizer.chat_template = chat_template(processor.image_token, tokenizer.pad_token)
    processor.save_pretrained(folder)
    return processor


def head(heads: dict, name: str):
    """A checkpoint's head (query_head / page_head) as sentence-transformers' Dense on the token embeddings."""
    from sentence_transformers.base.modules import Dense

    weight, bias = heads[f"{name}.weight"], heads[f"{name}.bias"]
    return Dense(
        weight.shape[1],
        weight.shape[0],
        bias=True,
        activation_function=torch.nn.Identity(),
        init_weight=weight.clone(),
        init_bias=bias.clone(),
        module_input_name="token_embeddings",
    )


def write_sentence_transformers(folder: str, ckpt: dict, model_id: str) -> None:
    """The sentence-transformers files of an exported folder (see the module docstring), the processor read from
    `model_id` (the backbone the checkpoint was trained on)."""
    from sentence_transformers import __version__
    from sentence_transformers.base.modules import Normalize, Router
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask

    processor = write_processor(folder, model_id)
    with open(os.path.join(folder, "sentence_bert_config.json"), "w") as f:
        json.dump(transformer_config(ckpt["meta"]["max_tiles"]), f, indent=2)
    modules = [
        Router.for_query_document([head(ckpt["heads"], "query_head")], [head(ckpt["heads"], "page_head")]),
        Normalize(module_input_name="token_embeddings"),
        MultiVectorMask(keep_only_token_ids=[processor.image_token_id]),
    ]
    listing = [{"idx": 0, "name": "0", "path": "", "type": TRANSFORMER}]
    for idx, (path, module) in enumerate(zip(MODULE_FOLDERS, modules), 1):
        os.makedirs(os.path.join(folder, path))
        module.save(os.path.join(folder, path))
        listing.append(
            {"idx": idx, "name": str(idx), "path": path, "type": f"{type(module).__module__}.{type(module).__name__}"}
        )
    with open(os.path.join(folder, "modules.json"), "w") as f:
        json.dump(listing, f, indent=2)
    with open(os.path.join(folder, "config_sentence_transformers.json"), "w") as f:
        json.dump(
            {
                "model_type": "MultiVectorEncoder",
                "__version__": {"sentence_transformers": __version__},
                "prompts": {"query": "", "document": ""},
                "default_prompt_name": None,
                "similarity_fn_name": "maxsim",
            },
            f,
            indent=2,
        )


FORMAT_PROBE = "Which page shows the revenue? Какая страница? 哪一页 {{ }}"  # non-Latin text and template syntax


def check_formats(folder: str, processor) -> None:
    """The chat template written into `folder`, read back as sentence-transformers reads it (AutoProcessor), must
    render a query and a page as `processor` (ColInternProcessor) does; raises UserValueError naming the file
    otherwise."""
    from PIL import Image
    from transformers import AutoProcessor

    written = AutoProcessor.from_pretrained(folder)
    renders = {}
    for task, item, expected in (
        ("query", {"type": "text", "text": FORMAT_PROBE}, processor.query_texts([FORMAT_PROBE])[0]),
        ("document", {"type": "image", "image": Image.new("RGB", (32, 32))}, processor.page_prompt),
    ):
        got = written.apply_chat_template([{"role": "user", "content": [item]}], task=task, tokenize=False)
        renders[task] = (got, expected)
    wrong = {task: pair for task, pair in renders.items() if pair[0] != pair[1]}
    if wrong:
        raise UserValueError(
            f"{os.path.join(folder, 'chat_template.jinja')} renders {wrong} (written, expected): "
            f"sentence-transformers would not see ColIntern's formats"
        )
