"""Every file format tinyclip-edge writes or reads, one module each (docs/FORMATS.md describes them):

- ``model_dir``: a model directory's ``config.json`` (``ModelConfig``) beside ``model.safetensors``.
- ``bundle``: an export bundle's ``manifest.json`` (``BundleManifest``), its file names, and ``write_reader``,
  which copies ``clip_bundle.py`` (the standalone reader every bundle carries, stdlib + numpy + Pillow +
  onnxruntime only) into it.
- ``engine``: the ``<tower>.engine.json`` sidecar next to a TensorRT engine (``EngineSidecar``).
- ``base``: ``VersionedFile`` and the parts several formats share.
- The two reports build on ``VersionedFile`` beside the code that renders them, their names and format ids with
  them: ``export.parity_report.ParityReport`` (``parity.json``, named here by ``bundle.PARITY_NAME`` because a
  bundle holds it) and ``runtimes.bench_report.BenchReport`` (``bench.json``). Their ``read`` checks types and
  ranges and that derived fields (a verdict, a speed-up) agree with the numbers they are derived from, so an
  edited or corrupt report is an error, not a wrong table.

``read`` validates every field's type and range (``common.typed``), that every path the file names stays inside
the artifact's directory (symlinks resolved), and for bundles that every file's recorded sha256 matches
(``common.integrity``; digests are cached by inode, size, mtime and ctime in the user cache dir). Any problem is
one ``UserError`` naming the file and the field. ``write`` validates the same way before writing atomically,
so an exporter cannot write what a reader would refuse.

A format's file names are defined in its module and nowhere else. These modules are leaves: no torch, no onnx.
"""
