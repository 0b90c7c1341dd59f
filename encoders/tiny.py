"""A tiny text encoder built from a config: what tests, benchmarks and demos train in seconds.

2 layers, 32 wide, BERT, with all-MiniLM-L6-v2's tokenizer (from a local folder, so nothing is
downloaded); a real sentence-transformers folder that registers, serves and trains like any
other model. Not for quality, only for exercising the machinery quickly.
"""

from __future__ import annotations

from pathlib import Path


def build_tiny_text_model(tokenizer_dir: Path, folder: Path, architecture: str = "bert", pooling: str = "mean") -> Path:
    """Write the model under `folder` and return its path (`folder/model`).

    `architecture` "roberta" gives RoBERTa's learned positions that start after the padding
    index; `pooling` is any sentence-transformers pooling mode. Both exist to exercise code
    that depends on them (packed inference), not for use.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel, RobertaConfig, RobertaModel

    config_class, model_class, extra = {
        "bert": (BertConfig, BertModel, {}),
        "roberta": (RobertaConfig, RobertaModel, {"max_position_embeddings": 130}),
    }[architecture]
    raw = folder / "raw"
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    shape = dict(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class(config_class(**{**shape, **extra})).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    transformer = Transformer(str(raw), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(32, pooling), Normalize()], device="cpu")
    out = folder / "model"
    model.save(str(out))
    return out
