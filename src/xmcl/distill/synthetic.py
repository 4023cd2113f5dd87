"""Built-in driving scenes: a seeded street, a spinning lidar and pinhole cameras, all ray-cast.

A scene is a straight road (with lane markings) between raised sidewalks, terrain strips,
buildings with windows, parked and moving cars, poles, pedestrians and trees. Solids are
yaw-oriented boxes, vertical cylinders and spheres standing on the ground plane
``z = ground_z``; the lidar sits at the origin of the lidar frame (x forward, y left, z up).

* Lidar: ``LIDAR_RINGS`` rings at HDL-32-like elevations x an azimuth count chosen to reach
  ``num_points_target`` returns; each ray stops at the nearest surface (real occlusion), the
  range gets Gaussian noise, a few returns drop out, and intensity = material reflectance x
  incidence factor. Labels are the class of the surface hit.
* Cameras: ray-cast per pixel centre from each camera's own centre (mounted beside the lidar,
  so parallax is real), per-class / per-object colours, world-anchored texture, Lambert
  shading, haze and pixel noise; sky pixels have label -1.

Classes (``CLASS_NAMES``): road, sidewalk, terrain, building, car, pole, pedestrian,
vegetation, with a street-like imbalance (road and building dominate, pedestrians are rare).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xmcl.distill.geometry import pad_to_4x4
from xmcl.distill.scene import CameraView, Scene
from xmcl.errors import ConfigError

CLASS_NAMES = ("road", "sidewalk", "terrain", "building", "car", "pole", "pedestrian", "vegetation")
ROAD, SIDEWALK, TERRAIN, BUILDING, CAR, POLE, PEDESTRIAN, VEGETATION = range(len(CLASS_NAMES))

LIDAR_RINGS = 32
LIDAR_ELEVATION_DEG = (-30.67, 10.67)
LIDAR_RANGE = (1.0, 70.0)
RANGE_NOISE_M = 0.02
DROPOUT = 0.03
CAMERA_RANGE = 300.0
SENSOR_HEIGHT = 1.8
CURB_HEIGHT = 0.15
STREET_HALF_LENGTH = 90.0
EPS = 1e-6

# reflectance (lidar intensity scale) and base colour (RGB in [0, 1]) of each class
REFLECTANCE = np.array([0.12, 0.25, 0.30, 0.35, 0.55, 0.45, 0.20, 0.40])
MARKING_REFLECTANCE = 0.70
CLASS_COLOUR = np.array([
    [0.28, 0.28, 0.30], [0.62, 0.60, 0.57], [0.42, 0.48, 0.25], [0.70, 0.62, 0.52],
    [0.60, 0.10, 0.10], [0.50, 0.50, 0.52], [0.30, 0.30, 0.60], [0.18, 0.45, 0.15],
])
CAR_PALETTE = np.array([[0.9, 0.9, 0.9], [0.08, 0.08, 0.1], [0.5, 0.5, 0.52], [0.65, 0.1, 0.1],
                        [0.1, 0.2, 0.55], [0.75, 0.75, 0.78], [0.2, 0.35, 0.2]])
BUILDING_PALETTE = np.array([[0.70, 0.62, 0.52], [0.55, 0.35, 0.28], [0.80, 0.78, 0.72],
                             [0.45, 0.47, 0.50], [0.75, 0.68, 0.45]])
WINDOW_COLOUR = np.array([0.16, 0.19, 0.26])
MARKING_COLOUR = np.array([0.92, 0.92, 0.88])
TRUNK_COLOUR = np.array([0.35, 0.25, 0.15])
SKY_HORIZON, SKY_ZENITH = np.array([0.78, 0.84, 0.92]), np.array([0.33, 0.53, 0.85])
HAZE = np.array([0.72, 0.76, 0.80])

NO_HIT, GROUND, BOX, CYLINDER, SPHERE = range(5)


@dataclass
class Boxes:
    """Yaw-oriented boxes: ``centre`` (B, 3), ``half`` (B, 3) half extents, ``yaw`` (B,) about z."""

    centre: np.ndarray
    half: np.ndarray
    yaw: np.ndarray
    label: np.ndarray
    colour: np.ndarray


@dataclass
class Cylinders:
    """Vertical cylinders: ``centre_xy`` (C, 2), ``z_range`` (C, 2) bottom/top, ``radius`` (C,)."""

    centre_xy: np.ndarray
    z_range: np.ndarray
    radius: np.ndarray
    label: np.ndarray
    colour: np.ndarray


@dataclass
class Spheres:
    """Spheres: ``centre`` (S, 3), ``radius`` (S,)."""

    centre: np.ndarray
    radius: np.ndarray
    label: np.ndarray
    colour: np.ndarray


@dataclass
class Layout:
    """A street in the lidar frame. Road frame: rotate by ``-road_yaw``; the road centreline is
    ``y_road = road_offset`` and the road covers ``|y_road - road_offset| <= road_half_width``."""

    ground_z: float
    road_yaw: float
    road_offset: float
    road_half_width: float
    boxes: Boxes
    cylinders: Cylinders
    spheres: Spheres

    def to_road_frame(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) lidar-frame x, y -> road-frame (along, across) coordinates."""
        c, s = np.cos(self.road_yaw), np.sin(self.road_yaw)
        return np.stack([c * xy[:, 0] + s * xy[:, 1], -s * xy[:, 0] + c * xy[:, 1]], axis=1)

    def ground_label(self, xy: np.ndarray) -> np.ndarray:
        """Class of the ground plane at lidar-frame x, y: road inside the carriageway, else terrain."""
        across = self.to_road_frame(xy)[:, 1] - self.road_offset
        return np.where(np.abs(across) <= self.road_half_width, ROAD, TERRAIN)

    def lane_marking(self, xy: np.ndarray) -> np.ndarray:
        """True on painted lines: a dashed centreline (3 m on, 3 m off) and two solid edge lines."""
        road = self.to_road_frame(xy)
        across = np.abs(road[:, 1] - self.road_offset)
        centre = (across < 0.08) & (np.mod(road[:, 0], 6.0) < 3.0)
        edge = np.abs(across - (self.road_half_width - 0.3)) < 0.08
        return centre | edge


class _Builder:
    """Collects solids in the road frame (along, across, z) and maps them to the lidar frame."""

    def __init__(self) -> None:
        self.boxes: list[tuple] = []
        self.cylinders: list[tuple] = []
        self.spheres: list[tuple] = []

    def box(self, centre, half, yaw, label, colour) -> None:
        self.boxes.append((centre, half, yaw, label, colour))

    def cylinder(self, xy, z0, z1, radius, label, colour) -> None:
        self.cylinders.append((xy, (z0, z1), radius, label, colour))

    def sphere(self, centre, radius, label, colour) -> None:
        self.spheres.append((centre, radius, label, colour))

    def build(self, ground_z: float, road_yaw: float, road_offset: float, road_half_width: float) -> Layout:
        c, s = np.cos(road_yaw), np.sin(road_yaw)
        rot = np.array([[c, -s], [s, c]])

        def xy(values) -> np.ndarray:
            return np.asarray(values, dtype=np.float64).reshape(-1, 2) @ rot.T

        def column(items, k, width=None) -> np.ndarray:
            out = np.array([item[k] for item in items], dtype=np.float64)
            return out.reshape(-1, width) if width else out

        b, cy, sp = self.boxes, self.cylinders, self.spheres
        box_centre = column(b, 0, 3)
        box_centre[:, :2] = xy(box_centre[:, :2])
        sphere_centre = column(sp, 0, 3)
        sphere_centre[:, :2] = xy(sphere_centre[:, :2])
        return Layout(
            ground_z=ground_z, road_yaw=road_yaw, road_offset=road_offset, road_half_width=road_half_width,
            boxes=Boxes(box_centre, column(b, 1, 3), column(b, 2) + road_yaw,
                        column(b, 3).astype(np.int64), column(b, 4, 3)),
            cylinders=Cylinders(xy(column(cy, 0, 2)), column(cy, 1, 2), column(cy, 2),
                                column(cy, 3).astype(np.int64), column(cy, 4, 3)),
            spheres=Spheres(sphere_centre, column(sp, 1), column(sp, 2).astype(np.int64), column(sp, 3, 3)),
        )


def _jitter(rng: np.random.Generator, colour: np.ndarray, amount: float = 0.06) -> np.ndarray:
    return np.clip(colour + rng.normal(0.0, amount, 3), 0.0, 1.0)


def random_layout(seed: int) -> Layout:
    """A random street around the sensor, determined by ``seed``."""
    rng = np.random.default_rng([seed, 0])
    g = -SENSOR_HEIGHT
    half_width = float(rng.uniform(4.0, 7.5))
    offset = float(rng.uniform(-0.5, 0.5) * half_width)  # the sensor drives in a lane
    walk = float(rng.uniform(2.0, 4.0))
    yaw = float(rng.uniform(-0.3, 0.3))
    L = STREET_HALF_LENGTH
    b = _Builder()
    for side in (-1.0, 1.0):
        curb = offset + side * half_width
        walk_mid = curb + side * walk / 2
        b.box((0.0, walk_mid, g + CURB_HEIGHT / 2), (L, walk / 2, CURB_HEIGHT / 2), 0.0, SIDEWALK,
              _jitter(rng, CLASS_COLOUR[SIDEWALK], 0.03))
        outer = curb + side * walk
        top = g + CURB_HEIGHT
        # buildings with terrain strips and trees in front of them and in the gaps
        x = -L + rng.uniform(0, 10)
        while x < L:
            length = rng.uniform(8, 25)
            setback = rng.uniform(1.0, 6.0)
            depth = rng.uniform(8, 15)
            height = rng.uniform(5, 20)
            across = outer + side * (setback + depth / 2)
            b.box((x + length / 2, across, g + height / 2), (length / 2, depth / 2, height / 2), 0.0, BUILDING,
                  _jitter(rng, BUILDING_PALETTE[rng.integers(len(BUILDING_PALETTE))]))
            if setback > 2.5 and rng.random() < 0.6:
                _tree(b, rng, (x + rng.uniform(0, length), outer + side * setback / 2), g)
            x += length
            gap = rng.uniform(0, 8) if rng.random() < 0.5 else 0.0
            if gap > 3:
                _tree(b, rng, (x + gap / 2, outer + side * rng.uniform(2, 6)), g)
            x += gap
        # bushes on the terrain strip
        for _ in range(rng.poisson(4)):
            r = rng.uniform(0.5, 1.2)
            b.sphere((rng.uniform(-L, L), outer + side * rng.uniform(0.5, 1.5), g), r, VEGETATION,
                     _jitter(rng, CLASS_COLOUR[VEGETATION]))
        # poles near the curb
        x = -L + rng.uniform(0, 20)
        while x < L:
            b.cylinder((x, curb + side * 0.5), top, top + rng.uniform(5, 8), rng.uniform(0.08, 0.15), POLE,
                       _jitter(rng, CLASS_COLOUR[POLE], 0.04))
            x += rng.uniform(12, 30)
        # pedestrians on the sidewalk
        for _ in range(rng.poisson(3)):
            _pedestrian(b, rng, (rng.uniform(-40, 40), curb + side * rng.uniform(0.8, walk - 0.4)), top)
        # parked cars along the curb
        x = -L + rng.uniform(0, 6)
        car_y = curb - side * 1.1
        while x < L:
            if rng.random() < 0.45 and not (abs(x) < 4 and abs(car_y) < 2.5):  # not on the sensor's own car
                _car(b, rng, (x, car_y), g, yaw=0.0 if side < 0 else np.pi)
            x += rng.uniform(5.5, 8)
    # moving cars in the two lanes, keeping clear of the sensor's own car
    for lane in (-1.0, 1.0):
        lane_y = offset + lane * half_width / 2
        for _ in range(rng.poisson(2.5)):
            x = rng.uniform(-50, 50)
            if abs(x) < 6 and abs(lane_y) < 2.5:
                continue
            _car(b, rng, (x, lane_y + rng.normal(0, 0.2)), g, yaw=(0.0 if lane < 0 else np.pi) + rng.normal(0, 0.03))
    # now and then someone crossing the road
    if rng.random() < 0.4:
        _pedestrian(b, rng, (rng.uniform(8, 30) * rng.choice([-1, 1]), offset + rng.uniform(-1, 1) * half_width), g)
    return b.build(g, yaw, offset, half_width)


def _tree(b: _Builder, rng: np.random.Generator, xy: tuple[float, float], g: float) -> None:
    trunk = rng.uniform(1.8, 3.0)
    radius = rng.uniform(1.5, 3.0)
    b.cylinder(xy, g, g + trunk + radius * 0.5, rng.uniform(0.12, 0.25), VEGETATION, _jitter(rng, TRUNK_COLOUR))
    b.sphere((xy[0], xy[1], g + trunk + radius * 0.8), radius, VEGETATION, _jitter(rng, CLASS_COLOUR[VEGETATION]))


def _pedestrian(b: _Builder, rng: np.random.Generator, xy: tuple[float, float], floor: float) -> None:
    b.cylinder(xy, floor, floor + rng.uniform(1.55, 1.9), rng.uniform(0.22, 0.3), PEDESTRIAN, rng.uniform(0.1, 0.9, 3))


def _car(b: _Builder, rng: np.random.Generator, xy: tuple[float, float], g: float, yaw: float) -> None:
    length, width, height = rng.uniform(3.8, 4.9), rng.uniform(1.7, 2.0), rng.uniform(1.4, 1.7)
    colour = CAR_PALETTE[rng.integers(len(CAR_PALETTE))]
    body = 0.55 * height
    b.box((xy[0], xy[1], g + body / 2), (length / 2, width / 2, body / 2), yaw, CAR, colour)
    back = -0.1 * length  # the cabin sits a little behind the middle
    cabin_xy = (xy[0] + back * np.cos(yaw), xy[1] + back * np.sin(yaw))
    b.box((cabin_xy[0], cabin_xy[1], g + body + (height - body) / 2),
          (0.28 * length, 0.45 * width, (height - body) / 2), yaw, CAR, 0.45 * colour + 0.1)


# ----------------------------------------------------------------------------- ray casting


def _bounding_circles(layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """(K, 2) centres and (K,) radii of the xy bounding circles of boxes, cylinders, spheres (in that order)."""
    centres = np.concatenate([layout.boxes.centre[:, :2], layout.cylinders.centre_xy, layout.spheres.centre[:, :2]])
    radii = np.concatenate([np.linalg.norm(layout.boxes.half[:, :2], axis=1), layout.cylinders.radius,
                            layout.spheres.radius])
    return centres, radii


def _hit_boxes(o: np.ndarray, d: np.ndarray, boxes: Boxes, idx: np.ndarray) -> np.ndarray:
    """(n, k) entry distances of rays ``o + t d`` into boxes ``idx`` (inf where missed), slab method."""
    c, s = np.cos(boxes.yaw[idx]), np.sin(boxes.yaw[idx])
    rel = o - boxes.centre[idx]
    local_o = (c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1], rel[:, 2])
    local_d = (np.outer(d[:, 0], c) + np.outer(d[:, 1], s), np.outer(-d[:, 0], s) + np.outer(d[:, 1], c),
               np.repeat(d[:, 2:3], len(idx), axis=1))
    near = np.full((d.shape[0], len(idx)), -np.inf)
    far = np.full((d.shape[0], len(idx)), np.inf)
    for axis in range(3):
        dl = local_d[axis]
        dl = np.where(np.abs(dl) < 1e-12, 1e-12, dl)
        h = boxes.half[idx, axis]
        ta = (-h - local_o[axis]) / dl
        tb = (h - local_o[axis]) / dl
        np.maximum(near, np.minimum(ta, tb), out=near)
        np.minimum(far, np.maximum(ta, tb), out=far)
    return np.where((near <= far) & (near > EPS), near, np.inf)


def _hit_cylinders(o: np.ndarray, d: np.ndarray, cyl: Cylinders, idx: np.ndarray) -> np.ndarray:
    """(n, k) entry distances into vertical cylinders (side wall or top cap), inf where missed."""
    rel = o[:2] - cyl.centre_xy[idx]
    r = cyl.radius[idx]
    z0, z1 = cyl.z_range[idx, 0], cyl.z_range[idx, 1]
    a = np.maximum(d[:, 0] ** 2 + d[:, 1] ** 2, 1e-12)[:, None]
    half_b = np.outer(d[:, 0], rel[:, 0]) + np.outer(d[:, 1], rel[:, 1])
    c = (rel ** 2).sum(axis=1) - r ** 2
    disc = half_b ** 2 - a * c
    with np.errstate(invalid="ignore"):
        t_side = (-half_b - np.sqrt(disc)) / a
    z_side = o[2] + t_side * d[:, 2:3]
    side_ok = (disc >= 0) & (t_side > EPS) & (z_side >= z0) & (z_side <= z1)
    dz = np.where(np.abs(d[:, 2]) < 1e-12, -1e-12, d[:, 2])[:, None]
    t_top = (z1 - o[2]) / dz
    px = rel[:, 0] + t_top * d[:, 0:1]
    py = rel[:, 1] + t_top * d[:, 1:2]
    top_ok = (t_top > EPS) & (px ** 2 + py ** 2 <= r ** 2) & (o[2] > z1)
    return np.minimum(np.where(side_ok, t_side, np.inf), np.where(top_ok, t_top, np.inf))


def _hit_spheres(o: np.ndarray, d: np.ndarray, sph: Spheres, idx: np.ndarray) -> np.ndarray:
    """(n, k) entry distances into spheres, inf where missed."""
    rel = o - sph.centre[idx]
    half_b = d @ rel.T
    c = (rel ** 2).sum(axis=1) - sph.radius[idx] ** 2
    disc = half_b ** 2 - c
    with np.errstate(invalid="ignore"):
        t = -half_b - np.sqrt(disc)
    return np.where((disc >= 0) & (t > EPS), t, np.inf)


@dataclass
class _Hits:
    t: np.ndarray       # (N,) distance along the unit ray, inf = no hit
    kind: np.ndarray    # (N,) NO_HIT, GROUND, BOX, CYLINDER or SPHERE
    index: np.ndarray   # (N,) index within its kind, -1 for ground / no hit


def _cast(layout: Layout, origin: np.ndarray, dirs: np.ndarray, max_range: float, sector_deg: float = 4.0) -> _Hits:
    """Nearest surface along each unit ray from ``origin``.

    Rays are grouped into azimuth sectors and tested only against solids whose xy bounding
    circle, seen from the origin, overlaps the sector (and lies within ``max_range``).
    """
    n = dirs.shape[0]
    t = np.full(n, np.inf)
    kind = np.full(n, NO_HIT, dtype=np.int64)
    index = np.full(n, -1, dtype=np.int64)
    down = dirs[:, 2] < -1e-12
    t_ground = np.where(down, (layout.ground_z - origin[2]) / np.where(down, dirs[:, 2], -1.0), np.inf)
    hit = t_ground <= max_range
    t[hit], kind[hit] = t_ground[hit], GROUND

    centres, radii = _bounding_circles(layout)
    rel = centres - origin[:2]
    dist = np.linalg.norm(rel, axis=1)
    phi = np.arctan2(rel[:, 1], rel[:, 0])
    spread = np.where(dist > radii, np.arcsin(np.clip(radii / np.maximum(dist, 1e-9), 0, 1)), np.pi)
    reachable = dist - radii <= max_range
    width = np.deg2rad(sector_deg)
    num_sectors = int(np.ceil(2 * np.pi / width))
    sector = np.minimum(((np.arctan2(dirs[:, 1], dirs[:, 0]) + np.pi) / width).astype(np.int64), num_sectors - 1)
    order = np.argsort(sector, kind="stable")
    bounds = np.searchsorted(sector[order], np.arange(num_sectors + 1))
    counts = np.cumsum([0, len(layout.boxes.yaw), len(layout.cylinders.radius), len(layout.spheres.radius)])
    casters = ((BOX, _hit_boxes, layout.boxes), (CYLINDER, _hit_cylinders, layout.cylinders),
               (SPHERE, _hit_spheres, layout.spheres))
    for s in range(num_sectors):
        rays = order[bounds[s]:bounds[s + 1]]
        if rays.size == 0:
            continue
        mid = -np.pi + (s + 0.5) * width
        gap = np.abs(np.angle(np.exp(1j * (phi - mid))))
        candidates = np.flatnonzero(reachable & (gap <= width / 2 + spread))
        d = dirs[rays]
        for k, (solid_kind, caster, solids) in enumerate(casters):
            idx = candidates[(candidates >= counts[k]) & (candidates < counts[k + 1])] - counts[k]
            if idx.size == 0:
                continue
            ts = caster(origin, d, solids, idx)
            best = np.argmin(ts, axis=1)
            tb = ts[np.arange(rays.size), best]
            better = (tb < t[rays]) & (tb <= max_range)
            sel = rays[better]
            t[sel], kind[sel], index[sel] = tb[better], solid_kind, idx[best[better]]
    return _Hits(t=t, kind=kind, index=index)


def _labels(layout: Layout, hits: _Hits, points: np.ndarray) -> np.ndarray:
    """Class of each hit (-1 where nothing was hit)."""
    out = np.full(hits.t.shape, -1, dtype=np.int64)
    for solid_kind, solids in ((BOX, layout.boxes), (CYLINDER, layout.cylinders), (SPHERE, layout.spheres)):
        m = hits.kind == solid_kind
        out[m] = solids.label[hits.index[m]]
    g = hits.kind == GROUND
    out[g] = layout.ground_label(points[g, :2])
    return out


def _normals(layout: Layout, hits: _Hits, points: np.ndarray) -> np.ndarray:
    """(N, 3) outward unit normals at the hit points (zeros where nothing was hit)."""
    normals = np.zeros_like(points)
    normals[hits.kind == GROUND] = (0.0, 0.0, 1.0)
    m = hits.kind == BOX
    if m.any():
        i = hits.index[m]
        c, s = np.cos(layout.boxes.yaw[i]), np.sin(layout.boxes.yaw[i])
        rel = points[m] - layout.boxes.centre[i]
        local = np.stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1], rel[:, 2]], axis=1)
        ratio = np.abs(local) / layout.boxes.half[i]
        axis = np.argmax(ratio, axis=1)
        n_local = np.zeros_like(local)
        n_local[np.arange(len(i)), axis] = np.sign(local[np.arange(len(i)), axis])
        normals[m] = np.stack([c * n_local[:, 0] - s * n_local[:, 1], s * n_local[:, 0] + c * n_local[:, 1],
                               n_local[:, 2]], axis=1)
    m = hits.kind == CYLINDER
    if m.any():
        i = hits.index[m]
        on_top = np.abs(points[m, 2] - layout.cylinders.z_range[i, 1]) < 1e-4
        radial = (points[m, :2] - layout.cylinders.centre_xy[i]) / layout.cylinders.radius[i, None]
        normals[m] = np.where(on_top[:, None], [0.0, 0.0, 1.0], np.concatenate([radial, np.zeros((len(i), 1))], 1))
    m = hits.kind == SPHERE
    if m.any():
        i = hits.index[m]
        normals[m] = (points[m] - layout.spheres.centre[i]) / layout.spheres.radius[i, None]
    return normals


# ----------------------------------------------------------------------------- lidar


def lidar_directions(azimuth_steps: int, rng: np.random.Generator) -> np.ndarray:
    """(LIDAR_RINGS * azimuth_steps, 3) unit ray directions of one sweep (a random azimuth phase per ring)."""
    elevation = np.deg2rad(np.linspace(*LIDAR_ELEVATION_DEG, LIDAR_RINGS))
    phase = rng.uniform(0, 2 * np.pi / azimuth_steps, LIDAR_RINGS)
    azimuth = np.linspace(-np.pi, np.pi, azimuth_steps, endpoint=False)[None, :] + phase[:, None]
    el = np.repeat(elevation[:, None], azimuth_steps, axis=1)
    return np.stack([np.cos(el) * np.cos(azimuth), np.cos(el) * np.sin(azimuth), np.sin(el)], axis=-1).reshape(-1, 3)


def scan_lidar(layout: Layout, rng: np.random.Generator,
               num_points_target: int = 30000) -> tuple[np.ndarray, np.ndarray]:
    """Lidar sweep from the origin: ``points`` (P, 4) float32 x, y, z, intensity and ``labels`` (P,) int64.

    The azimuth count is set from a coarse pre-sweep's return rate so that P is close to
    ``num_points_target``; returns nearer than ``LIDAR_RANGE[0]`` or beyond ``LIDAR_RANGE[1]`` are dropped.
    """
    origin = np.zeros(3)
    coarse = _cast(layout, origin, lidar_directions(256, rng), LIDAR_RANGE[1])
    rate = max(float(np.mean((coarse.t >= LIDAR_RANGE[0]) & np.isfinite(coarse.t))), 0.05) * (1 - DROPOUT)
    steps = max(int(round(num_points_target / (LIDAR_RINGS * rate))), 16)
    dirs = lidar_directions(steps, rng)
    hits = _cast(layout, origin, dirs, LIDAR_RANGE[1])
    keep = np.isfinite(hits.t) & (hits.t >= LIDAR_RANGE[0]) & (rng.random(hits.t.shape) >= DROPOUT)
    hits = _Hits(hits.t[keep], hits.kind[keep], hits.index[keep])
    dirs = dirs[keep]
    surface = origin + hits.t[:, None] * dirs
    labels = _labels(layout, hits, surface)
    cos_incidence = np.abs((_normals(layout, hits, surface) * dirs).sum(axis=1))
    reflectance = np.where((hits.kind == GROUND) & layout.lane_marking(surface[:, :2]), MARKING_REFLECTANCE,
                           REFLECTANCE[labels])
    intensity = np.clip(reflectance * (0.4 + 0.6 * cos_incidence) * (1 + 0.1 * rng.standard_normal(len(labels))),
                        0.0, 1.0)
    noisy = hits.t + np.clip(rng.normal(0.0, RANGE_NOISE_M, len(labels)), -3 * RANGE_NOISE_M, 3 * RANGE_NOISE_M)
    xyz = origin + noisy[:, None] * dirs
    return np.concatenate([xyz, intensity[:, None]], axis=1).astype(np.float32), labels


# ----------------------------------------------------------------------------- cameras


@dataclass(frozen=True)
class PinholeCamera:
    """A level pinhole camera at ``position`` (lidar frame) looking along azimuth ``yaw``."""

    position: tuple[float, float, float]
    yaw: float
    image_size: tuple[int, int]
    horizontal_fov_deg: float = 90.0

    @property
    def intrinsic(self) -> np.ndarray:
        """(3, 3) ``[[f, 0, cx], [0, f, cy], [0, 0, 1]]`` with square pixels and the centre in the middle."""
        height, width = self.image_size
        f = (width / 2) / np.tan(np.deg2rad(self.horizontal_fov_deg) / 2)
        return np.array([[f, 0.0, (width - 1) / 2], [0.0, f, (height - 1) / 2], [0.0, 0.0, 1.0]])

    @property
    def rotation(self) -> np.ndarray:
        """(3, 3) lidar -> camera (x right, y down, z forward): rows are right, down, forward in the lidar frame."""
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        return np.array([[s, -c, 0.0], [0.0, 0.0, -1.0], [c, s, 0.0]])

    @property
    def lidar_to_image(self) -> np.ndarray:
        """(4, 4) ``K [R | -R c]``."""
        extrinsic = np.eye(4)
        extrinsic[:3, :3] = self.rotation
        extrinsic[:3, 3] = -self.rotation @ np.asarray(self.position)
        return pad_to_4x4(self.intrinsic) @ extrinsic

    def pixel_rays(self) -> np.ndarray:
        """(H * W, 3) unit lidar-frame directions through the pixel centres, row-major."""
        height, width = self.image_size
        v, u = np.mgrid[0:height, 0:width]
        k = self.intrinsic
        cam = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u, dtype=np.float64)], -1)
        dirs = cam.reshape(-1, 3) @ self.rotation
        return dirs / np.linalg.norm(dirs, axis=1, keepdims=True)


def _value_noise(points: np.ndarray, cell: float, salt: int) -> np.ndarray:
    """Blocky world-anchored noise in [0, 1): an integer hash of the ``cell``-metre grid cell of each point."""
    q = np.floor(points / cell).astype(np.int64).astype(np.uint64)
    h = np.uint64((salt * 0x9E3779B97F4A7C15) % (1 << 64))
    for axis, prime in enumerate((0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xD6E8FEB86659FD93)):
        h = (h ^ (q[:, axis] * np.uint64(prime))) * np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(29)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def render_camera(layout: Layout, camera: PinholeCamera,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast ``image`` (H, W, 3) uint8 and per-pixel class ``labels`` (H, W) int64 (-1 = sky)."""
    origin = np.asarray(camera.position, dtype=np.float64)
    dirs = camera.pixel_rays()
    hits = _cast(layout, origin, dirs, CAMERA_RANGE)
    hit = hits.kind != NO_HIT
    surface = origin + np.where(hit, hits.t, 0.0)[:, None] * dirs
    labels = _labels(layout, hits, surface)

    colour = np.zeros_like(dirs)
    for solid_kind, solids in ((BOX, layout.boxes), (CYLINDER, layout.cylinders), (SPHERE, layout.spheres)):
        m = hits.kind == solid_kind
        colour[m] = solids.colour[hits.index[m]]
    g = hits.kind == GROUND
    colour[g] = CLASS_COLOUR[labels[g]]
    colour[g & layout.lane_marking(surface[:, :2])] = MARKING_COLOUR
    colour = _surface_detail(layout, hits, surface, labels, colour)

    sun = np.array([0.4 * np.cos(layout.road_yaw + 0.7), 0.4 * np.sin(layout.road_yaw + 0.7), 0.85])
    sun /= np.linalg.norm(sun)
    shade = 0.45 + 0.55 * np.clip(_normals(layout, hits, surface) @ sun, 0.0, 1.0)
    texture = 1.0 + 0.12 * (_value_noise(surface, 0.25, 1) - 0.5) + 0.08 * (_value_noise(surface, 1.0, 2) - 0.5)
    texture[labels == VEGETATION] += 0.35 * (_value_noise(surface[labels == VEGETATION], 0.3, 3) - 0.5)
    texture[labels == TERRAIN] += 0.25 * (_value_noise(surface[labels == TERRAIN], 0.4, 4) - 0.5)
    colour = colour * (shade * texture)[:, None]
    haze = 1.0 - np.exp(-np.where(hit, hits.t, 0.0) / 250.0)
    colour = colour * (1 - haze[:, None]) + HAZE * haze[:, None]
    up = np.clip(dirs[:, 2], 0.0, 1.0)[:, None] ** 0.6
    colour[~hit] = (SKY_HORIZON * (1 - up) + SKY_ZENITH * up)[~hit]
    colour += rng.normal(0.0, 0.015, colour.shape)
    height, width = camera.image_size
    image = np.clip(np.rint(colour * 255), 0, 255).astype(np.uint8).reshape(height, width, 3)
    return image, labels.reshape(height, width)


def _surface_detail(layout: Layout, hits: _Hits, surface: np.ndarray, labels: np.ndarray,
                    colour: np.ndarray) -> np.ndarray:
    """Windows on building walls (3 m grid above the ground floor), sidewalk tiles, two-tone pedestrians."""
    m = (hits.kind == BOX) & (labels == BUILDING)
    if m.any():
        i = hits.index[m]
        c, s = np.cos(layout.boxes.yaw[i]), np.sin(layout.boxes.yaw[i])
        rel = surface[m] - layout.boxes.centre[i]
        along_x = c * rel[:, 0] + s * rel[:, 1]
        along_y = -s * rel[:, 0] + c * rel[:, 1]
        half = layout.boxes.half[i]
        on_x_face = np.abs(np.abs(along_x) - half[:, 0]) < 1e-3
        facade = np.where(on_x_face, along_y, along_x)
        height = surface[m, 2] - layout.ground_z
        wall = np.abs(surface[m, 2] - (layout.boxes.centre[i, 2] + half[:, 2])) > 1e-3
        window = wall & (height > 3.0) & (np.mod(facade, 3.0) > 0.9) & (np.mod(facade, 3.0) < 2.2) \
            & (np.mod(height, 3.0) > 0.9) & (np.mod(height, 3.0) < 2.1)
        rows = np.flatnonzero(m)[window]
        colour[rows] = WINDOW_COLOUR
    m = labels == SIDEWALK
    if m.any():
        road = layout.to_road_frame(surface[m, :2])
        joint = (np.mod(road[:, 0], 1.0) < 0.04) | (np.mod(road[:, 1], 1.0) < 0.04)
        colour[np.flatnonzero(m)[joint]] *= 0.8
    m = labels == PEDESTRIAN
    if m.any():
        i = hits.index[m]
        z0, z1 = layout.cylinders.z_range[i, 0], layout.cylinders.z_range[i, 1]
        rel = (surface[m, 2] - z0) / (z1 - z0)
        rows = np.flatnonzero(m)
        colour[rows[rel < 0.45]] *= 0.4               # trousers
        colour[rows[rel > 0.87]] = (0.85, 0.68, 0.55)  # head
    return colour


# ----------------------------------------------------------------------------- scenes


def camera_rig(num_cameras: int, image_size: tuple[int, int]) -> list[PinholeCamera]:
    """``num_cameras`` level cameras with evenly spaced yaws (the first looks forward), each 0.3 m
    out from the lidar axis and 0.3 m below it; 90 degree horizontal field of view."""
    yaws = 2 * np.pi * np.arange(num_cameras) / num_cameras
    return [PinholeCamera((0.3 * np.cos(y), 0.3 * np.sin(y), -0.3), float(y), image_size) for y in yaws]


def generate_scene(seed: int, num_points_target: int = 30000, image_size: tuple[int, int] = (160, 320),
                   num_cameras: int = 2) -> Scene:
    """A built-in driving scene: lidar points with per-point labels and ``num_cameras`` rendered views.

    ``image_size`` is (height, width). Deterministic in all arguments.
    """
    if num_points_target < 100:
        raise ConfigError(f"num_points_target must be at least 100, got {num_points_target}")
    if len(image_size) != 2 or min(image_size) < 8:
        raise ConfigError(f"image_size must be (height, width) of at least 8 pixels each, got {image_size}")
    if num_cameras < 1:
        raise ConfigError(f"num_cameras must be at least 1, got {num_cameras}")
    layout = random_layout(seed)
    points, labels = scan_lidar(layout, np.random.default_rng([seed, 1]), num_points_target)
    views = []
    for k, camera in enumerate(camera_rig(num_cameras, image_size)):
        image, pixel_labels = render_camera(layout, camera, np.random.default_rng([seed, 2, k]))
        views.append(CameraView(image=image, lidar_to_image=camera.lidar_to_image, name=f"cam{k}", labels=pixel_labels))
    return Scene(points=points, cameras=views, labels=labels, class_names=CLASS_NAMES, name=f"synthetic/{seed}")


class SyntheticScenes:
    """``n`` built-in scenes; scene ``i`` is ``generate_scene(seed_i, **kwargs)`` with ``seed_i``
    drawn from ``(seed, i)``, so datasets with different seeds do not share scenes."""

    def __init__(self, n: int, seed: int = 0, **scene_kwargs) -> None:
        if n < 1:
            raise ConfigError(f"the number of synthetic scenes must be at least 1, got {n}")
        self.n = n
        self.seed = seed
        self.scene_kwargs = scene_kwargs

    def __len__(self) -> int:
        return self.n

    def scene_seed(self, i: int) -> int:
        return int(np.random.SeedSequence([self.seed, i]).generate_state(1)[0])

    def __getitem__(self, i: int) -> Scene:
        if not -self.n <= i < self.n:
            raise IndexError(f"scene {i} requested from {self.n} synthetic scenes")
        return generate_scene(self.scene_seed(i % self.n), **self.scene_kwargs)
