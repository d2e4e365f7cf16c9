"""A preference dataset's pair report: rows training will split at their shared dialogue, and
rows whose two responses would collapse into one input; stored, shown and dry-run."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.datasets.pairs import pair_report
from service.datasets.reading import DatasetFormat
from service.datasets.rows import DatasetKind
from service.datasets.validation import check_file, parse_file
from tests.service.helpers import CLASSIFICATION_ROWS, Headers, jsonl, upload

HISTORY = "\n\nHuman: Is the movie any good?\n\nAssistant: Which one?\n\nHuman: The new one."
ROWS = [
    # Whole dialogues, as HH-RLHF has them: split at the last shared turn.
    {
        "chosen": f"{HISTORY}\n\nAssistant: Reviews are mixed.",
        "rejected": f"{HISTORY}\n\nAssistant: Who cares.",
    },
    # The same, differing only in case and spacing once split: one input to the tokenizer.
    {
        "chosen": f"{HISTORY}\n\nAssistant: It is  Fine.",
        "rejected": f"{HISTORY}\n\nAssistant: it is fine.",
    },
    # A prompt is given: left as it is, even though its texts share a turn boundary.
    {
        "prompt": "A question",
        "chosen": f"{HISTORY}\n\nAssistant: Yes.",
        "rejected": f"{HISTORY}\n\nAssistant: No.",
    },
    # No turn markers: nothing to split; accents alone do not tell the two apart.
    {"chosen": "Café", "rejected": "cafe"},
    {"chosen": "a good film", "rejected": "a bad film"},
]


def test_the_report_counts_split_and_collapsing_rows() -> None:
    assert pair_report(ROWS) == {"split_rows": 2, "identical_pairs": 2}
    parsed = parse_file(jsonl(ROWS), DatasetKind.PREFERENCE, DatasetFormat.JSONL)
    assert parsed.pair_report == {"split_rows": 2, "identical_pairs": 2}
    assert parsed.rows[0] == ROWS[0]  # stored as sent: training splits, the switch is its own
    report = check_file(jsonl(ROWS), DatasetKind.PREFERENCE, DatasetFormat.JSONL)
    assert report.valid and report.pair_report == {"split_rows": 2, "identical_pairs": 2}
    classification = parse_file(
        jsonl(CLASSIFICATION_ROWS), DatasetKind.CLASSIFICATION, DatasetFormat.JSONL
    )
    assert classification.pair_report is None


def test_the_dataset_object_and_the_dry_run_show_the_report(
    client: TestClient, auth: Headers
) -> None:
    resp = upload(client, auth, jsonl(ROWS), kind="preference")
    assert resp.status_code == 200, resp.text
    expected = {"split_rows": 2, "identical_pairs": 2}
    assert resp.json()["pair_report"] == expected
    got = client.get(f"/v1/datasets/{resp.json()['id']}", headers=auth).json()
    assert got["pair_report"] == expected
    dry = client.post(
        "/v1/datasets/validate",
        headers=auth,
        data={"kind": "preference"},
        files={"file": ("pairs.jsonl", jsonl(ROWS))},
    ).json()
    assert dry["valid"] and dry["pair_report"] == expected
    classification = upload(client, auth, jsonl(CLASSIFICATION_ROWS)).json()
    assert classification["pair_report"] is None
