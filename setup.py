"""The one compiled part: orchestrator/_jpeg_region.c, a partial JPEG decoder for the CPU input
pipeline. Optional: where libjpeg's headers are missing (`apt install libjpeg-dev`,
`dnf install libjpeg-turbo-devel`) the build skips it with a warning and the pipeline decodes
whole images instead (same pixels, ~1.3x the CPU per training image). Everything else is in
pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "orchestrator._jpeg_region",
            ["orchestrator/_jpeg_region.c"],
            libraries=["jpeg"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
