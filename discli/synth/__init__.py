"""A seeded synthetic benchmark: a fair miniature of semi-supervised segmentation with captions.

``generate_benchmark(out)`` writes, in the real formats (so the real preparation code runs on it)::

    OUT/VOCdevkit/VOC2012/JPEGImages/*.jpg           labelled and test images
    OUT/VOCdevkit/VOC2012/SegmentationClass/*.png    their labelmaps (VOC palette PNGs)
    OUT/VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt   the pixel-labelled part
    OUT/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt     the test part
    OUT/idw/images/*.jpg, OUT/idw/captions.jsonl     the tagged part: web-style captions
    OUT/idw/true_tags.jsonl, OUT/idw/labels/*.png    hidden truth for measurement only
    OUT/classes.txt, OUT/benchmark.json              class list; settings and measured noise
    OUT/manifests/{train,val,tagged,tagged_oracle}.jsonl   (unless manifests=False)

What makes it a *fair* miniature rather than a colour-sorting toy (see
``shared/notes/findings.md``: a set whose classes differ only by colour puts the baseline above
90 mIoU and leaves no room for semi-supervision to show anything):

- classes differ by *shape* (aeroplane: fuselage, swept wings and tail; bird: body, head, beak,
  wing, tail; boat: hull, mast and sails; car: body, cabin, windows and wheels; cat: body, head,
  ears, legs and tail), with random aspect, rotation, mirroring and scale;
- colours and textures are drawn from class-dependent mixtures over *shared* palettes and
  texture kinds, so every colour and texture occurs in several classes and colour alone never
  decides the class;
- backgrounds are textured and cluttered, with distractor blobs that borrow the objects'
  colours, textures and part shapes (a lone ellipse, a triangle, a pair of dark circles, a
  cross) but are background, and occluders drawn over objects;
- 1 to 3 objects per image, often touching or overlapping; image sides vary (48-96 px by
  default); blur, sensor noise and JPEG compression; VOC-style 1-pixel void (255) borders;
- captions are sentences (templates, synonyms, plurals, counts, and words like "category",
  "cart", "boathouse" that must *not* be read as classes) whose tags are noisy like web
  captions: each present class is left unmentioned with probability ``miss_rate`` and, with
  probability ``spurious_rate``, an absent class is named. ``parse_caption`` of every caption
  gives exactly the intended noisy tags (checked while generating).

The difficulty levels (:data:`DIFFICULTIES`: clutter, distractors, occluders, how strongly a class
keeps to its typical look, object size) were measured with one seed, the ``tiny`` backbone (C =
64), AdamW 0.002, labelmap + tag loss on 64 px crops of batch 8, 1 CPU thread, mIoU on the 100
test images; *baseline* trains on the 30 labelled images, *bound* on those plus the 400 tagged
images with their true labelmaps:

- ``hard``: baseline 21 mIoU and bound 37 after 1000 steps of batch 16; even the bound of a full
  demo run stayed at 35, too little room for semi-supervision to show anything;
- ``easy``: baseline 25.4 after 2000 steps (it has overfitted its 30 images by then),
  bound 46.0 after 3000 steps (still underfitting); with 100 labelled images the baseline reaches
  36.4 after 1500 steps;
- ``medium`` (the generator's default) sits between them by construction; not measured in its
  final form;
- ``clear`` (at most one clutter item, no distractors or occluders, typical looks cubed) and
  ``vivid`` (the same with looks to the sixth power: a class mostly wears its typical colour, so
  the remaining confusions are between classes that share one, and shapes): with the demo's
  schedule (1500/300/500 steps, then 1200 more for the bound) and the shipped ``shapes`` backbone
  weights, ``clear`` gave baseline 28.4 and bound 50.0, ``vivid`` (the demo's) 34.3 and 54.6
  (one seed). From scratch ``clear`` gave 24.1 and 43.8; the stride-8 output itself is not the
  limit (perfect features pooled to stride 8 and upsampled score 85.8 mIoU at 48-96 px).

- ``bold`` (the demo's, with images of 72-120 px): large objects (half-extent 0.38-0.5 of the
  short side), one or two per image and rarely touching, at most one clutter item, and
  *signature* looks (:data:`~discli.synth.looks.SIGNATURE_LOOKS`: each class one dominant
  colour, worn about 92% of the time, another class's otherwise). Every other level leaves the
  tiny backbone's fully supervised bound at 50-60 mIoU because it underfits (with signature
  looks and large objects at 48-96 px the bound scored 57.9 on its own training images, 53.6
  on the test ones); on ``bold`` with 20 labelled images the demo preset gave baseline 38.4
  and bound 64.6 (seed 0; with 30 labelled images the baseline is 44.8). Measured on the way
  there, bounds at seed 0 with 20 labelled images: signature looks at 48-96 px with the
  default layout 52.1 (looks squared: 59.4), with large objects 53.6 (at 72-120 px 57.2); the
  ``vivid`` looks with the ``bold`` layout at 72-120 px 59.6 (baseline 32.6); 4000 instead of
  1500 steps of step 1 on ``bold`` 65.8; from scratch, the tiny backbone with C = 128 62.3 and
  the ``small`` one with C = 128 64.6.

Colour alone (a lookup table of quantised RGB fitted on the very images it is scored on, as in
``tests/test_data_synthetic.py``) reaches under 0.4 mean IoU over the object classes on
``easy``, ``medium`` and ``hard`` (the test), 0.30 on ``vivid``, but 0.59 on ``bold`` at 72-120
px (0.51 at 48-96): there a class is mostly its colour, and the tiny backbone's bound (object
classes about 0.60 IoU) learns little more than that. What ``bold`` shows is how far a model
trained on 20 labelled images gets at learning the classes' looks, and how much pseudo-labels
of tagged images add; shape matters more on the other levels.

Modules: :mod:`~discli.synth.looks` (palette, textures, class looks, difficulty levels),
:mod:`~discli.synth.shapes` (class shapes, distractors), :mod:`~discli.synth.scenes` (one image
and its labelmap), :mod:`~discli.synth.captions` (captions and their noisy tags),
:mod:`~discli.synth.writing` (the benchmark on disk); this package exports their public
names.

Every image draws from its own generator seeded by (seed, part, index): the same seed gives
byte-identical files, and changing ``n_tagged`` does not change the labelled or test images.
"""

from __future__ import annotations

from discli.synth.captions import make_caption, noisy_mentions
from discli.synth.looks import DIFFICULTIES, LOOKS, PALETTE, TEXTURES, Difficulty, Look
from discli.synth.scenes import Scene, render_scene
from discli.synth.shapes import ANY_LOOK, DEFAULT_CLASSES, SHAPES, SOURCE_CLASSES
from discli.synth.writing import (SynthConfig, bound_manifest, generate_benchmark,
                                  oracle_manifest, write_benchmark_manifests)

__all__ = ["ANY_LOOK", "DEFAULT_CLASSES", "DIFFICULTIES", "Difficulty", "LOOKS", "Look",
           "PALETTE", "SHAPES", "SOURCE_CLASSES", "Scene", "SynthConfig", "TEXTURES",
           "bound_manifest", "generate_benchmark", "make_caption", "noisy_mentions",
           "oracle_manifest", "render_scene", "write_benchmark_manifests"]
