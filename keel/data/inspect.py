"""Looking at the data a run is fed, for people and reports: every row of a batch (`keel data inspect`), what
the batches before a step consumed of each source (`keel data stats`), and the unigram baseline of the loss.
Read-only functions of a `DataSource`; nothing here changes what is served.
"""

from __future__ import annotations

import numpy as np

from keel.data.loader import DataSource


def unigram_entropy(data: DataSource) -> float:
    """Entropy (nats) of the mixture's unigram token distribution: the loss of the best context-free model, the
    baseline a held-out loss is compared with."""
    weights = data.eval_weights
    p = sum(weights[s.name] * s.train.unigram / max(1, s.train.unigram.sum()) for s in data.sources)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def source_stats(data: DataSource, step: int) -> list[dict]:
    """Per source: its size, and what the batches before `step` consumed of it."""
    consumed = data.plan.cumulative(np.array([step]))[0]
    out = []
    for i, s in enumerate(data.sources):
        n = int(data.order.n_sequences[i])
        out.append({"source": s.name, "store": str(s.store.path), "weight": s.weight,
                    "documents": s.train.n_documents, "tokens": s.train.n_tokens, "sequences": n,
                    "sequences_consumed": int(consumed[i]), "tokens_consumed": int(consumed[i]) * data.seq_len,
                    "epochs_consumed": consumed[i] / n, "max_epochs": s.max_epochs})
    return out


def inspect_batch(data: DataSource, step: int, host: int = 0, n_hosts: int = 1,
                  text_chars: int = 200) -> list[dict]:
    """Every row of the global batch at `step` (or of one host's rows): source, documents, decoded text."""
    rows = data.rows(step)
    per = data.batch_size // n_hosts
    width = data.seq_len + 1
    out = []
    for r in range(host * per, (host + 1) * per):
        s = int(rows.source[0, r])
        split = data.sources[s].train
        seq = int(rows.sequence[0, r])
        start = seq * data.seq_len
        text = data.tokenizer.decode(split.tokens(start, start + width).tolist(), skip_special_tokens=False)
        out.append({"row": r, "source": data.sources[s].name, "sequence": seq, "epoch": int(rows.epoch[0, r]),
                    "tokens": [start, start + width],
                    "documents": [{"id": d, "start": a, "end": b}
                                  for d, a, b in split.documents_in(start, start + width)],
                    "text": text if len(text) <= text_chars else text[:text_chars] + "…"})
    return out
