"""fusionlens.world — the built-in simulated multi-sensor driving world.

Interface::

    from fusionlens.world import WorldConfig, generate_sample, render_frame
    cfg = WorldConfig()                       # defaults below; WorldConfig.paper() = 224x400 images, 200x200x8
    sample = generate_sample(cfg, seed=0, split="train", index=7)   # a fusionlens.data.sample.Sample
    frame = render_frame(cfg, 0, "train", 7)  # the Sample plus simulator truth: frame.camera.object_ids
                                              # (Ncam, H, W), frame.lidar.object_ids, frame.radar.object_ids,
                                              # frame.radar.sensor_origin, frame.scene, frame.conditions, frame.rig

WorldConfig defaults: image_size=(64, 112) per camera (6 cameras, nuScenes intrinsics rescaled), grid =
BEVGrid(bounds=((-50, 50), (-50, 50), (-5, 5)), shape=(96, 96, 8)), classes = all six, vehicles=(8, 20),
parked=(2, 8), pedestrians=(2, 10), time_probs day/dusk/night 0.55/0.2/0.25, condition_probs rain 0.2, fog 0.15,
glare 0.2, camera_blackout 0.12, lens_occlusion 0.12, radar_dropout 0.12, lidar_beam_loss 0.2, 32 LiDAR beams x
360 azimuth steps to 70 m, 5 radars x 5 sweeps to 75 m with 1.5 deg azimuth noise, sensor_noise=1.0 (0 = exact).

Sample contents: images (6, 3, H, W) in [0, 1]; radar (N, 19) RADAR_FIELDS in the ego frame, 5 sweeps with
time_lag; lidar (N, 5) x, y, z, intensity 0-255, ring; boxes (Nb, 9) and box_labels for vehicles and
pedestrians inside the grid; BEV labels from fusionlens.data.labels (objects no sensor saw are invalid);
visibility per box: camera_pixels / camera_frac / camera_signal (Nb, 6), lidar_points (Nb,), radar_points (Nb,),
visible (Nb,); meta: seed, split, index, layout, ego_speed, conditions (dict), tags (active condition names,
time of day first, e.g. ["night", "fog", "radar_dropout"]), camera_names.
"""

# The world renders fusionlens.data Samples, and fusionlens.data's package imports the world's dataset
# (data.builtin -> world.generate): load fusionlens.data completely first, so that importing the world before
# anything else does not meet a partially initialised world.conditions on the way back.
import fusionlens.data  # noqa: F401  (import order, see above)
from fusionlens.world.conditions import Conditions
from fusionlens.world.config import CONDITIONS, ROAD_LAYOUTS, TIMES_OF_DAY, WorldConfig
from fusionlens.world.generate import SPLITS, WorldFrame, generate_sample, render_frame, rig_for

__all__ = [
    "CONDITIONS", "Conditions", "ROAD_LAYOUTS", "SPLITS", "TIMES_OF_DAY", "WorldConfig", "WorldFrame",
    "generate_sample", "render_frame", "rig_for",
]
