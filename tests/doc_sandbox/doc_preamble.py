"""Run before every ```python block of the docs (tests/test_doc_commands.py): the names a snippet
uses without defining them. `sd0`, `sd1`, `sd2`: the tiny base/math/code models' tensors."""

from safetensors.torch import load_file

sd0, sd1, sd2 = ({k: v for f in sorted(__import__("pathlib").Path(f"models/{m}").glob("*.safetensors"))
                  for k, v in load_file(str(f)).items()} for m in ("base", "math", "code"))
