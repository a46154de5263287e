"""The platform plugin conformance suite: ``kvserve conformance NAME``, or ``pytest --pyargs kvserve.conformance
--kvserve-platform NAME``. Every check holds the selected platform's hooks to kvserve's portable references and
skips, saying why, what the platform does not provide (a dtype it does not list, an op it leaves to torch, a
scheme it runs on the reference, graphs it does not capture)."""
