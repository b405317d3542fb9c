"""racecar_gym-compatible simulator backends (see issue 4): spec, JAX, PyBullet."""
