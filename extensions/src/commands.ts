/**
 * The extension's commands: create a notebook through the server (which never overwrites) and open it.
 * Kept apart from the sidebar so the palette, the launcher and the sidebar buttons share one implementation.
 */
import { JupyterFrontEnd } from '@jupyterlab/application';
import { showErrorMessage } from '@jupyterlab/apputils';
import { IDocumentManager } from '@jupyterlab/docmanager';
import { IDefaultFileBrowser } from '@jupyterlab/filebrowser';
import { LabIcon } from '@jupyterlab/ui-components';

import { createNotebook, INotebookRequest, NotebookKind } from './api';

export namespace CommandIDs {
  export const openAnalysis = 'moe-workbench:open-analysis';
  export const openWorkbench = 'moe-workbench:open-workbench';
  export const newLive = 'moe-workbench:new-live';
  export const refresh = 'moe-workbench:refresh';
  export const showSidebar = 'moe-workbench:show-sidebar';
}

export interface ICommandContext {
  app: JupyterFrontEnd;
  docManager: IDocumentManager;
  fileBrowser: IDefaultFileBrowser | null;
  icon: LabIcon;
  refresh: () => Promise<void>;
  showSidebar: () => void;
}

async function createAndOpen(context: ICommandContext, request: INotebookRequest, what: string): Promise<string | null> {
  try {
    const path = await createNotebook(request);
    context.docManager.openOrReveal(path);
    void context.refresh(); // the file browser shows the new notebook by itself; keep the sidebar in step too
    return path;
  } catch (err) {
    await showErrorMessage(`Cannot create the ${what}`, err instanceof Error ? err.message : String(err));
    return null;
  }
}

function storeArgument(args: Record<string, unknown>, command: string): string {
  const store = args.store;
  if (typeof store !== 'string' || store.length === 0) {
    throw new Error(`${command} needs a "store" argument: the path of a trace store under the server root`);
  }
  return store;
}

export function addCommands(context: ICommandContext): void {
  const { commands } = context.app;
  // the two store commands differ only in the notebook kind they ask the server for
  const storeCommands: [string, NotebookKind, string, string, string][] = [
    [CommandIDs.openAnalysis, 'analysis', 'Open analysis notebook', 'analysis notebook',
      'Create a notebook beside the trace store that opens it with xarray and runs the analyses'],
    [CommandIDs.openWorkbench, 'workbench', 'Open in workbench', 'workbench notebook',
      'Create a notebook beside the trace store with the dashboard on it']
  ];
  for (const [id, kind, label, what, caption] of storeCommands) {
    commands.addCommand(id, {
      label,
      caption,
      execute: args => createAndOpen(context, { kind, store: storeArgument(args, id) }, what)
    });
  }
  commands.addCommand(CommandIDs.newLive, {
    label: args => (args.isLauncher ? 'Live workbench' : 'New live workbench'),
    caption: 'Create a notebook with the dashboard on the default model',
    icon: context.icon,
    execute: args => {
      // the launcher passes its folder as `cwd`; the palette uses the file browser's current folder
      const dir = typeof args.cwd === 'string' ? args.cwd : (context.fileBrowser?.model.path ?? '');
      return createAndOpen(context, { kind: 'live', dir }, 'live workbench notebook');
    }
  });
  commands.addCommand(CommandIDs.refresh, {
    label: 'Refresh trace stores',
    caption: 'List the trace stores under the server root again',
    execute: () => context.refresh()
  });
  commands.addCommand(CommandIDs.showSidebar, {
    label: 'Show trace stores',
    caption: 'Open the MoE Workbench sidebar',
    execute: () => context.showSidebar()
  });
}
