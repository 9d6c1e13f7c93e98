"""Tiny random-weight Llama checkpoints for the tests, one per flavour the engine must handle."""
from __future__ import annotations

from pathlib import Path

from workers.demo import LLAMA3_ROPE_SCALING, hf_config, write_checkpoint

# MHA Llama 2 style, weights split over a sharded index.
LLAMA2_MHA = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                  rope_theta=10000.0, dtype="float32")
# Llama 3.2 style: GQA, tied embeddings, llama3 RoPE scaling, stored in bf16 (computed in fp32).
LLAMA3_GQA_TIED = dict(vocab_size=640, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072,
                       rope_theta=500000.0, rope_scaling=LLAMA3_ROPE_SCALING, tie_word_embeddings=True,
                       dtype="bfloat16", bos_token_id=1, eos_token_id=[2, 3])
# The transformers >= 5 `rope_parameters` config form (llama3 scaling inside it).
LLAMA3_ROPE_PARAMETERS = dict(LLAMA3_GQA_TIED, rope_form="parameters", tie_word_embeddings=False, dtype="float32")


def make_checkpoint(root: Path, name: str, spec: dict, num_shards: int = 1, seed: int = 0) -> Path:
    return write_checkpoint(root / name, hf_config(**spec), num_shards=num_shards, seed=seed)


def make_text_checkpoint(root: Path, name: str = "tok") -> Path:
    """LLAMA2_MHA with a real SentencePiece tokenizer (it needs a vocabulary of ~600 or more for its characters),
    so requests are detokenized and stop strings apply."""
    return write_checkpoint(root / name, hf_config(**dict(LLAMA2_MHA, vocab_size=1000)), tokenizer="llama2")


# ---- checkpoints that ship their own chat template ---------------------------------------------------------------

# meta-llama/Llama-3.1-8B-Instruct's chat template (tokenizer_config.json "chat_template"), verbatim: tools as JSON in
# the first user message (or the system prompt), one JSON tool call per assistant turn, tool results as ipython turns.
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n"
    "{%- if not date_string is defined %}\n    {%- set date_string = \"26 Jul 2024\" %}\n{%- endif %}\n"
    "{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n\n"
    "{#- System message + builtin tools #}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{%- if builtin_tools is defined or tools is not none %}\n    {{- \"Environment: ipython\\n\" }}\n{%- endif %}\n"
    "{%- if builtin_tools is defined %}\n"
    "    {{- \"Tools: \" + builtin_tools | reject('equalto', 'code_interpreter') | join(\", \") + \"\\n\\n\"}}\n"
    "{%- endif %}\n{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{%- if tools is not none and not tools_in_user_message %}\n"
    "    {{- \"You have access to the following functions. To call a function, please respond with JSON for a "
    "function call.\" }}\n"
    "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its "
    "value}.' }}\n"
    "    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n"
    "        {{- \"\\n\\n\" }}\n    {%- endfor %}\n{%- endif %}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n\n"
    "{#- Custom tools are passed in a user message with some extra guidance #}\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {#- Extract the first user message so we can plug it in here #}\n    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content']|trim %}\n        {%- set messages = messages[1:] %}\n"
    "    {%- else %}\n"
    "        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user message!\") }}\n"
    "{%- endif %}\n    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    "    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n"
    "    {{- \"with its proper arguments that best answers the given prompt.\\n\\n\" }}\n"
    "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its "
    "value}.' }}\n"
    "    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n"
    "        {{- \"\\n\\n\" }}\n    {%- endfor %}\n    {{- first_user_message + \"<|eot_id|>\"}}\n{%- endif %}\n\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n        {%- if not message.tool_calls|length == 1 %}\n"
    "            {{- raise_exception(\"This model only supports single tool-calls at once!\") }}\n        {%- endif %}\n"
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "            {{- \"<|python_tag|>\" + tool_call.name + \".call(\" }}\n"
    "            {%- for arg_name, arg_val in tool_call.arguments | items %}\n"
    "                {{- arg_name + '=\"' + arg_val + '\"' }}\n                {%- if not loop.last %}\n"
    "                    {{- \", \" }}\n                {%- endif %}\n                {%- endfor %}\n"
    "            {{- \")\" }}\n        {%- else  %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "            {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n            {{- '\"parameters\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n            {{- \"}\" }}\n        {%- endif %}\n"
    "        {%- if builtin_tools is defined %}\n            {#- This means we're in ipython mode #}\n"
    "            {{- \"<|eom_id|>\" }}\n        {%- else %}\n            {{- \"<|eot_id|>\" }}\n        {%- endif %}\n"
    "    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n"
    "        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n"
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n"
    "        {%- endif %}\n        {{- \"<|eot_id|>\" }}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"
)

# meta-llama/Llama-2-7b-chat-hf's chat template, verbatim.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def write_chat_tokenizer(folder: Path, family: str, chat_template=None, *, jinja_file: bool = False,
                         **config) -> Path:
    """Tokenizer files in the Hugging Face layout with a chat template, loadable by herd and by
    `transformers.AutoTokenizer`: "llama3" writes Meta's tiktoken vocabulary as a tokenizer.json (transformers'
    own TikTokenConverter), "llama2" a small SentencePiece tokenizer.model (keeps one already there). The
    template (a string, or a list of {name, template}) goes into tokenizer_config.json, or into
    chat_template.jinja with `jinja_file`; `config` adds tokenizer_config.json keys (e.g. legacy=True)."""
    import json

    from workers.demo_tokenizer import build_llama2_sentencepiece

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if family == "llama3":
        (folder / "tokenizer.json").write_bytes(_llama3_tokenizer_json())
        base = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>"}
    elif family == "llama2":
        if not (folder / "tokenizer.model").is_file():
            build_llama2_sentencepiece(folder / "tokenizer.model", vocab_size=1000)
        base = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    else:
        raise ValueError(f"unknown tokenizer family {family!r}")
    base.update(config)
    if chat_template is not None and jinja_file:
        (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    elif chat_template is not None:
        base["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(base, indent=2), encoding="utf-8")
    return folder


def make_chat_checkpoint(root: Path, name: str, family: str, chat_template=None, **config) -> Path:
    """A random-weight checkpoint (LLAMA2_MHA with vocab 1000, or LLAMA3_GQA_TIED with Llama 3's vocabulary) whose
    tokenizer ships `chat_template` (default: the real Llama 2 / Llama 3.1 chat template of its family)."""
    if family == "llama2":
        spec = dict(LLAMA2_MHA, vocab_size=1000)
        path = write_checkpoint(root / name, hf_config(**spec), tokenizer="llama2")
    else:
        spec = dict(LLAMA3_GQA_TIED, vocab_size=128256, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                    max_position_embeddings=4096, rope_scaling=None)
        path = write_checkpoint(root / name, hf_config(**spec))
    template = chat_template if chat_template is not None else \
        (LLAMA2_CHAT_TEMPLATE if family == "llama2" else LLAMA31_CHAT_TEMPLATE)
    return write_chat_tokenizer(path, family, template, **config)


_LLAMA3_JSON: list[bytes] = []


def _llama3_tokenizer_json() -> bytes:
    """Meta's Llama 3 tokenizer converted to tokenizer.json by transformers (once per test session)."""
    if not _LLAMA3_JSON:
        import tempfile

        from transformers.convert_slow_tokenizer import TikTokenConverter

        from workers.demo_tokenizer import llama3_tokenizer_path
        from workers.tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS

        converted = TikTokenConverter(vocab_file=str(llama3_tokenizer_path()), pattern=LLAMA3_PATTERN,
                                      extra_special_tokens=LLAMA3_SPECIAL_TOKENS).converted()
        with tempfile.TemporaryDirectory() as tmp:
            converted.save(f"{tmp}/tokenizer.json")
            _LLAMA3_JSON.append(Path(f"{tmp}/tokenizer.json").read_bytes())
    return _LLAMA3_JSON[0]
