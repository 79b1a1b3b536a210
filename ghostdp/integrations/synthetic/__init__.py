"""The DP synthetic-text app: private labelled text in, DP synthetic text out, with its evaluation.

Stages (each resumable, each in its own module): ``pipeline`` (train, synthesize, evaluate over one run
folder, laid out in ``run_folder``), ``synthesize`` (label-prefixed sampling from the DP model),
``evaluate`` with ``classifiers`` (non-private), ``dp_classifiers`` (DP-SGD on real data), ``mauve``,
``memorization`` and ``report``; ``config`` and ``presets`` hold the settings; ``text_data`` and
``embeddings`` read data and embed it. The app uses the Hugging Face drop-in (``ghostdp.integrations.hf``)
and the engine; nothing below it imports the app.
"""
