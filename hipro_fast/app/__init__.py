"""Layer 5: the application behind the ``hipro`` command: the pipeline that
chains the method's steps on a task spec, plots and run reports."""
