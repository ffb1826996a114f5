"""``nvmri validate``: the default protocol on random samples, graded against their truth.

Three parts, the first two pure functions:

* **generator** (:func:`~.generator.draw_sample`): seed ->
  :class:`~.generator.Truth` (NV depth, point spins as offsets from the NV,
  an optional surface layer) and the scenario file that describes it
  (:meth:`~.generator.Truth.scenario`); the distribution is documented in
  ``docs/validation.md``;
* **grader** (:func:`~.grader.grade_report`, :func:`~.grader.grade_sample`): a report.json
  dict against the truth -> found / missed / spurious spins and layers,
  per-axis errors and their sigmas, and a one-line cause for every failure;
  :func:`~.grader.summarise` pools the samples (coverage, medians, the issue's
  acceptance criteria);
* **runner** (:func:`~.runner.run`): writes each scenario file and runs the command a
  user types, ``nvmri demo --scenario FILE --out DIR``, in a subprocess (the
  demo starts its own IOC on its own Channel Access port), then grades
  ``DIR/report.json`` and prints a table.

The grader reads nothing but report.json and the truth the generator made.  The
modules: :mod:`.generator`, :mod:`.grader`, :mod:`.text` (the table) and
:mod:`.runner`.
"""
