"""The ``nalar`` command.

Where things live (the top layer: it may import every folder, ``workloads`` for the demo and ``bench``):

    main.py        the argument parser and the subcommands: up, node, policy, call, status, state, bench
    args.py        argparse conventions: global flags anywhere, options between positionals, help for a
                   missing subcommand; size and port argument types
    exits.py       the exit statuses (listed in ``nalar --help``)
    call.py        ``nalar call``: arguments inline, from ``@FILE`` or stdin, priority, max_payload refusals
    connect.py     the CLI's connection: ``--timeout`` bounds connecting too
    completion.py  ``nalar completion SHELL``: a completion script generated from the parser (shtab)
    serve.py       run a node until SIGINT/SIGTERM (shared by ``nalar node`` and ``nalar up``)
    up.py          ``nalar up``: an embedded NATS server and a node serving the demo, in one command
    policy.py      ``nalar policy``: the policy actor in its own process
    specs.py       ``module:Class[=N]`` on the command line -> (class, instance count)
    metrics.py     ``--metrics-port``/``--metrics-addr`` and the endpoint a node or policy process serves
    gateway_metrics.py  the gateway's Prometheus metrics (HTTP requests, latency, in flight) and ``/metrics``
    deploy/        not code: the compose profile's Prometheus config and a Grafana dashboard
"""
