"""The contract suite: what every backend must do alike, run once per backend.

Every test here takes the ``backend`` fixture (``tests/conftest.py``), so it
runs on a private ``memory://`` broker and on the real RabbitMQ, with the same
expected values: the memory broker is a fake that must answer like RabbitMQ,
and these tests are where that is checked.  A test that only RabbitMQ can
show (faults, signals, credentials, alarms) belongs in the other files;
``tests/conftest.py`` refuses a test in this folder that does not take
``backend``.
"""
