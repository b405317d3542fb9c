"""racecar_gym track scenes: load them, or compile their maps from the wall mesh alone.

    from rl.tracks import load_track, track_names, tile_tracks
    track = load_track("austria")            # ../shared/data/racecar_tracks/austria[.zip]
    track = load_track("procedural:7")       # rl.tracks.procedural, seeded

Modules, each importing only those above it:

    scene       where scenes and the cache live, reading a scene's yml, the pixel grid
    compile     the wall-mesh → maps compiler and its cache of compiled scenes
    procedural  seeded random circuits, written and compiled as scenes
    track       Track, load_track, track_names, tile_tracks, slot_tracks

This package re-exports their public names.
"""

from rl.tracks.compile import (
    COMPILER_VERSION,
    WALL_MARGIN_PX,
    close_gaps,
    compile_maps,
    compiled_scene,
    read_obj,
    ring_topology,
    save_maps,
    scene_grid,
    wall_footprint_triangles,
    wall_segments,
    wavefront_maps,
)
from rl.tracks.scene import (
    REPO_ROOT,
    TrackError,
    cache_dir,
    read_scene_config,
    resolve_scene,
    tracks_dir,
    world_to_pixel_array,
)
from rl.tracks.track import (
    MAP_KEYS,
    Track,
    centreline_from_maps,
    load_track,
    slot_tracks,
    tile_tracks,
    track_names,
)

__all__ = [
    "COMPILER_VERSION",
    "MAP_KEYS",
    "REPO_ROOT",
    "WALL_MARGIN_PX",
    "Track",
    "TrackError",
    "cache_dir",
    "centreline_from_maps",
    "close_gaps",
    "compile_maps",
    "compiled_scene",
    "load_track",
    "read_obj",
    "read_scene_config",
    "resolve_scene",
    "ring_topology",
    "save_maps",
    "scene_grid",
    "slot_tracks",
    "tile_tracks",
    "track_names",
    "tracks_dir",
    "wall_footprint_triangles",
    "wall_segments",
    "wavefront_maps",
    "world_to_pixel_array",
]
