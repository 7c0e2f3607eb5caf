"""Runs mergekit configs with mergekit's own Python API; executed by the side-by-side tests
with the python of a separate mergekit venv (never imported by mergelang's tests).

Usage: python mergekit_driver.py JOBS.json  -- JOBS: [[config.yml, out_dir, kind], ...] with kind
"yaml" (mergekit-yaml), "moe" (mergekit-moe), "multi" (mergekit-multi: the final merge in OUT, intermediates in
OUT_int/NAME) or "extract_lora" (config.yml: a JSON list of mergekit-extract-lora arguments); prints one line per job: "ok OUT" or "error OUT: message".
"""

import json
import sys

import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions


def main() -> None:
    for cfg_path, out, kind in json.load(open(sys.argv[1])):
        try:
            if kind == "extract_lora":  # cfg_path: a JSON list of mergekit-extract-lora's arguments
                from mergekit.scripts.extract_lora import main as extract

                extract.main(json.load(open(cfg_path)) + ["--out-path", out], standalone_mode=False)
                print("ok", out, flush=True)
                continue
            if kind == "moe":  # mergekit-moe (cheap_embed / random gates: no forward pass)
                from mergekit.moe.config import MoEMergeConfig
                from mergekit.scripts.moe import build

                with open(cfg_path) as f:
                    moe_cfg = MoEMergeConfig.model_validate(yaml.safe_load(f))
                build(moe_cfg, out, MergeOptions(copy_tokenizer=True, write_model_card=False,
                                                 quiet=True, random_seed=0), device="cpu")
                print("ok", out, flush=True)
                continue
            if kind == "multi":
                from mergekit.scripts.multimerge import main as multi

                multi.main([cfg_path, "--out-path", out, "-I", out + "_int", "--no-lazy",
                            "--random-seed", "0", "--quiet"], standalone_mode=False)
                print("ok", out, flush=True)
                continue
            with open(cfg_path) as f:
                cfg = MergeConfiguration.model_validate(yaml.safe_load(f))
            run_merge(cfg, out, MergeOptions(copy_tokenizer=True, write_model_card=False,
                                             quiet=True, random_seed=0,
                                             lora_merge_cache=out + "_lora"))  # model+lora
            print("ok", out, flush=True)
        except Exception as e:  # noqa: BLE001 - reported to the test
            print("error", out + ":", repr(e).replace("\n", " "), flush=True)


if __name__ == "__main__":
    main()
