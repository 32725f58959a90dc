"""Procedural road scenes: aligned visible / infrared / label triples.

The embedded default data set (DESIGN.md §4). A scene is a road seen from a
car: sky, a skyline of buildings and trees, a perspective road with lane marks,
kerbs (`curve`), guard rails, speed bumps, parking blocks (`car_stop`), traffic
cones, moving and parked cars, people and bikes, in daylight or at night.

Everything is drawn once, in depth order, into four aligned layers:

* colour (reflectance, RGB in [0, 1]) and light emitted at night (lamps,
  headlights, lit windows), combined with an illumination map (sun and
  shadows by day; a dim ambient plus lamp/headlight pools of light by night);
* temperature in [0, 1] from a small thermal model (sky cold, vegetation cool,
  road warm after a sunny day, people and running cars warm, tyres, engines and
  exhausts of running cars warmer still, parked cars near ambient, glass and
  metal reflecting the cold sky);
* the MFNet class id of the frontmost labelled thing (0 for background).

The visible image then gets texture, optics blur and sensor noise; the infrared
image is the temperature seen through a blurrier, noisier thermal camera
(non-uniformity, column fixed-pattern noise, gain/offset), so visible→infrared
is learnable but not trivial.

`generate_scene(seed, index)` is deterministic per `(seed, index)`.
`write_synthetic_dataset` writes scenes in the MSRS layout.

Modules: `synthetic.canvas` (layers, drawing, perspective), `synthetic.objects` (the
things in a scene), `synthetic.render` (`generate_scene`, image formation),
`synthetic.writer` (`write_synthetic_dataset`).
"""

from magicfuse.data.synthetic.render import GENERATOR_VERSION, MIN_SIZE, Scene, generate_scene
from magicfuse.data.synthetic.writer import scene_key, write_synthetic_dataset

__all__ = ["GENERATOR_VERSION", "MIN_SIZE", "Scene", "generate_scene", "scene_key", "write_synthetic_dataset"]
