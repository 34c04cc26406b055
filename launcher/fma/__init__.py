"""llm-d FMA: the ``/app/launcher.py`` entry's compatibility switches and the pod notifier sidecar."""
