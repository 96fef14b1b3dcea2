from tests.core.test_plugins import example_plugin  # noqa: F401 (fixture)


def test_plugin_tab_appears_and_shows_the_model(qtbot, example_plugin, tiny_dirs):  # noqa: F811
    from studio.ui.errors import get_reporter
    from studio.ui.main_window import MainWindow

    get_reporter().show_dialogs = False
    window = MainWindow()
    qtbot.addWidget(window)
    titles = [window.tabs.tabText(i) for i in range(window.tabs.count())]
    assert titles[-1] == "Model card"
    job = window.open_model(str(tiny_dirs["llama"]))
    qtbot.waitUntil(lambda: job.is_done, timeout=60000)
    qtbot.waitUntil(lambda: window.views["Model card"].form.rowCount() > 5, timeout=5000)
    window.state.runner.wait(20000)
