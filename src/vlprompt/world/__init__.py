"""The generated world: a miniature of CLIP's setting that runs offline on a laptop (docs/world.md).

* :mod:`vlprompt.world.scene` -- scenes of coloured, textured shapes, their captions, four rendering
  styles (domains); deterministic and random-access.
* :mod:`vlprompt.world.sets` -- the ``world-*`` classification data sets (base-to-new, cross-dataset,
  domain generalisation, few-shot), registered into ``vlprompt.data`` through
  ``vlprompt.data.registry.DATASET_ENTRY_POINTS`` (``data`` never imports this package).
* :mod:`vlprompt.world.pretrain` -- pretraining of the bundled ``vlp-world`` CLIP (open_clip's model
  and ``ClipLoss``, our loop), bit for bit reproducible on a CPU.

The layer sits beside ``data``: it imports ``data`` and ``backbones``; neither imports it.
"""
