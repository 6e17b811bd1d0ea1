"""Dataset readers. ``index`` (the place index, positives and VG file-name coordinates) is the leaf; ``vg``,
``msls``, ``toy_world`` and ``folders`` build place indexes from VG-benchmark folders, native Mapillary SLS, the
built-in generator and plain folders of photos, and never import each other; ``images`` decodes and preprocesses
image files. ``datasets_ws`` at the top level picks a reader by name."""
