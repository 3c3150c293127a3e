"""One run orchestrator under `atpt eval` and `benchmark_table`: the same run gives the same
rows through both, and they share the adversarial cache (one key schema)."""

import json

from atpt_plugin.adapters import benchmark_table, cli

from atpt_plugin.demo_model import load_demo_model

COMPARED = ("adapter", "n", "clean_acc", "adv_acc", "worst_case_acc", "clean_correct", "adv_correct")


def test_cli_and_benchmark_table_give_the_same_rows_and_share_the_cache(tmp_path, one_thread):
    cache = tmp_path / "cache"
    assert (
        cli.main(
            [
                "eval",
                "--adapters",
                "zeroshot,ens",
                "--set",
                "views=4",
                "--n-examples",
                "6",
                "--eps",
                "4",
                "--attack-steps",
                "2",
                "--attack-batch-size",
                "3",
                "--out",
                str(tmp_path / "cli"),
                "--cache-dir",
                str(cache),
                "--no-progress",
            ]
        )
        == 0
    )
    from_cli = json.loads((tmp_path / "cli" / "summary.json").read_text())["rows"]
    model, tokenizer, _ = load_demo_model()
    from_python = benchmark_table(
        ["zeroshot", "ens"],
        n_examples=6,
        dataset="demo",
        model=model,
        tokenizer=tokenizer,
        eps=4 / 255,
        steps=2,
        batch_size=3,
        overrides={"views": 4},
        cache_dir=cache,
    )
    assert [{k: row[k] for k in COMPARED} for row in from_cli] == [{k: row[k] for k in COMPARED} for row in from_python]
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1, "both paths must use one cache entry"
