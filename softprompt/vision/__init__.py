"""Visual and vision-language prompt tuning: the image side of softprompt.

    encoder.py    the image forward path: a frozen ViT-family encoder (ViT, DeiT, DINOv2, CLIP and SigLIP vision
                  towers) with visual prompt tokens inserted, the VPT-deep shared key/value path, the fingerprint
    vpt.py        VPT-shallow and VPT-deep (Jia et al. 2022): the tokens, their init rules, the methods
    coop.py       CoOp (Zhou et al. 2022): learned context vectors in CLIP's / SigLIP's text encoder; zero-shot
    images.py     image data (a class-folder tree, CSV/JSONL with an image-path column), bad images, preprocessing
    objective.py  `softprompt train --task image-classify`: the objective softprompt.trainer.fit trains
    api.py        `eval`, `predict`, `info` of an image prompt and the Python ImagePredictor

The methods are `vpt`, `vpt-deep` and `coop` in softprompt.methods.REGISTRY (its IMAGE_METHODS). This package
imports softprompt's core (config, checkpoint, trainer, methods), never the CLI or the server.

Notation: B images, C classes, S the encoder's own leading tokens ([CLS]; DeiT [CLS][DIST]; SigLIP none), N patch
tokens, P prompt tokens, L layers, d width, H heads, dh head dim, M CoOp context tokens, T text tokens.
"""
