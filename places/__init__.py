"""Dataset readers. ``index`` (the place index and positives) is the leaf; ``vg``, ``msls`` and ``toy_world`` build
place indexes from VG-benchmark folders, native Mapillary SLS and the built-in generator, and never import each
other; ``images`` decodes and preprocesses image files. ``datasets_ws`` at the top level picks a reader by name."""
