"""The application layer: the commands and pipelines users run, on top of the library.

``find`` (:mod:`.find`), ``evaluate`` (:mod:`.evaluate`), ``lens`` (:mod:`.lens`), ``patch``
(:mod:`.patch`), ``build-up`` (:mod:`.buildup`), the paper pipeline ``figures``
(:mod:`.figures`), the ``demo`` (:mod:`.demo`) and the real-model study (:mod:`.study`); what
the pipelines share: stage caching (:mod:`.stages`) and the command-line options generated from
their configs (:mod:`.options`). The CLI (:mod:`bigram_circuits.cli`) and the benchmarks call
these; the library never imports them.
Import the submodule you need (each pulls in torch and the models only when imported).
"""
