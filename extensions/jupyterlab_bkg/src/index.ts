// jupyterlab-bkg: the "bkg" sidebar, plugin detail panels, the llmserver chat, and command palette entries.
import { ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, MainAreaWidget, showErrorMessage, WidgetTracker } from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { ILauncher } from '@jupyterlab/launcher';

import { Live } from './api';
import { ChatPanel } from './chat';
import { PluginPanel } from './detail';
import { BkgSidebar, runAction } from './sidebar';

const CATEGORY = 'bkg';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyterlab-bkg:plugin',
  description: 'bkg plugin control panels, live status, logs, settings and chat.',
  autoStart: true,
  requires: [ICommandPalette],
  optional: [ILayoutRestorer, ILauncher],
  activate: (
    app: JupyterFrontEnd,
    palette: ICommandPalette,
    restorer: ILayoutRestorer | null,
    launcher: ILauncher | null
  ) => {
    const live = new Live();
    const tracker = new WidgetTracker<MainAreaWidget<PluginPanel>>({ namespace: 'bkg-plugin' });
    const { commands, shell } = app;

    const openPlugin = (id: string) => {
      const existing = tracker.find(w => w.content.pluginId === id);
      if (existing) {
        shell.activateById(existing.id);
        return;
      }
      const panel = new MainAreaWidget({ content: new PluginPanel(id, live) });
      panel.id = `bkg-plugin-area-${id}`;
      panel.title.label = `bkg: ${id}`;
      panel.title.closable = true;
      void tracker.add(panel);
      shell.add(panel, 'main');
      shell.activateById(panel.id);
    };

    const sidebar = new BkgSidebar(live, openPlugin);
    sidebar.title.label = 'bkg';
    shell.add(sidebar, 'left', { rank: 200 });
    if (restorer) {
      restorer.add(sidebar, 'bkg-sidebar');
      void restorer.restore(tracker, {
        command: 'bkg:open-plugin',
        args: w => ({ id: w.content.pluginId }),
        name: w => w.content.pluginId
      });
    }

    commands.addCommand('bkg:open-sidebar', {
      label: 'bkg: Show Plugins',
      execute: () => shell.activateById(sidebar.id)
    });
    commands.addCommand('bkg:refresh', {
      label: 'bkg: Refresh Plugins',
      execute: () => sidebar.refresh()
    });
    commands.addCommand('bkg:open-plugin', {
      label: args => (args.id ? `bkg: Open ${args.id}` : 'bkg: Open Plugin…'),
      execute: args => openPlugin(String(args.id))
    });
    for (const action of ['start', 'stop', 'restart'] as const) {
      commands.addCommand(`bkg:${action}`, {
        label: args => `bkg: ${action[0].toUpperCase()}${action.slice(1)} ${args.id ?? 'Plugin'}`,
        execute: args => runAction(String(args.id), action)
      });
    }
    let chat: MainAreaWidget<ChatPanel> | null = null;
    commands.addCommand('bkg:open-chat', {
      label: 'bkg: Chat with llmserver',
      caption: 'Chat with a local model served by bkg llmserver',
      execute: () => {
        if (!chat || chat.isDisposed) {
          chat = new MainAreaWidget({ content: new ChatPanel() });
          chat.id = 'bkg-chat-area';
          chat.title.label = 'bkg chat';
          shell.add(chat, 'main');
        }
        shell.activateById(chat.id);
      }
    });

    for (const command of ['bkg:open-sidebar', 'bkg:refresh', 'bkg:open-chat']) {
      palette.addItem({ command, category: CATEGORY });
    }
    // one palette entry per plugin and action, kept in step with the plugins the gateway hosts
    const added = new Set<string>();
    const addPluginItems = () => {
      for (const id of sidebar.pluginIds()) {
        for (const command of ['bkg:open-plugin', 'bkg:start', 'bkg:stop', 'bkg:restart']) {
          const key = `${command}|${id}`;
          if (!added.has(key)) {
            added.add(key);
            palette.addItem({ command, args: { id }, category: CATEGORY });
          }
        }
      }
    };
    live.onOpen(() => window.setTimeout(addPluginItems, 500));
    window.setTimeout(addPluginItems, 1500);
    if (launcher) {
      launcher.add({ command: 'bkg:open-chat', category: 'bkg', rank: 1 });
    }

    // "Open dashboard": one launcher item and palette entry per Voila dashboard
    let dashboardsUrl: string | null = null;
    commands.addCommand('bkg:open-dashboard', {
      label: args => `Dashboard: ${args.name}`,
      caption: args => `Open the bkg ${args.name} dashboard (Voila) in a new browser tab`,
      execute: args => {
        if (!dashboardsUrl) {
          return showErrorMessage(
            'No dashboards server',
            'Start the dashboards with `bkg dashboards` (or `make run`), then set BKG_DASHBOARDS_URL for JupyterLab.'
          );
        }
        window.open(URLExt.join(dashboardsUrl, 'voila', 'render', `${args.name}.ipynb`), '_blank');
      }
    });
    const settings = ServerConnection.makeSettings();
    void ServerConnection.makeRequest(URLExt.join(settings.baseUrl, 'bkg', 'dashboards'), {}, settings)
      .then(r => r.json())
      .then((info: { url: string | null; dashboards: string[] }) => {
        dashboardsUrl = info.url;
        info.dashboards.forEach((name, rank) => {
          palette.addItem({ command: 'bkg:open-dashboard', args: { name }, category: CATEGORY });
          launcher?.add({ command: 'bkg:open-dashboard', args: { name }, category: 'bkg', rank: 10 + rank });
        });
      })
      .catch(() => undefined);
  }
};

export default plugin;
