"""Batch evaluation over models x plans into results/ppl_results.txt and results/lm_eval_results.txt.

    python scripts/batch_eval.py --model smollm2-135m --plans fp16 rtn:int4:g64:asym runs/x/plan.json \\
        --eval wikitext2,ptb,c4 --seqlen 2048 --eval-windows 0 --tasks arc_easy,piqa --num-fewshot 0

`--help` lists every option; the logic lives in bitalloc/batch.py.
"""
import sys

from bitalloc.batch import main

if __name__ == "__main__":
    sys.exit(main())
